//! Prices per token class and what modifies them, looked up by provider and model id.
//!
//! Money is integer nano-dollars: a price of $X per million tokens is X*1000 nano-dollars per
//! token, exact for every published price (they have at most three decimals per million), so
//! costs add up without floating-point drift. A multiplier (fast mode, a geography, a regional
//! endpoint) scales each per-token rate once, rounded to the nano-dollar; tokens are then
//! multiplied by the scaled integer rate. Server tools add a fee per use.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{LongContextConfig, PriceConfig, PriceExtras, PriceFile};
use crate::glob::glob_match;
use crate::protocol::usage::{Speed, Usage};

/// The table that ships with Tollgate (see the file for its source and date).
pub const DEFAULT_PRICES: &str = include_str!("default_prices.toml");

/// The largest `max_tokens` assumed for a model the table does not limit.
pub const DEFAULT_MAX_OUTPUT: u64 = 128_000;

/// The largest prompt assumed for a model the table does not limit.
pub const DEFAULT_CONTEXT_WINDOW: u64 = 1_000_000;

/// Nano-dollars per token for each class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
}

impl Rates {
    fn from_usd(input: f64, output: f64, cache_read: f64, cache_write_5m: f64, cache_write_1h: f64) -> Self {
        Rates {
            input: nanos(input),
            output: nanos(output),
            cache_read: nanos(cache_read),
            cache_write_5m: nanos(cache_write_5m),
            cache_write_1h: nanos(cache_write_1h),
        }
    }

    /// Every rate times `m`, each rounded to the nano-dollar.
    pub fn scaled(self, m: f64) -> Rates {
        if m == 1.0 {
            return self;
        }
        let s = |r: u64| (r as f64 * m).round() as u64;
        Rates {
            input: s(self.input),
            output: s(self.output),
            cache_read: s(self.cache_read),
            cache_write_5m: s(self.cache_write_5m),
            cache_write_1h: s(self.cache_write_1h),
        }
    }

    /// The dearest rate a prompt token can be billed at (usually a 1-hour cache write).
    fn dearest_prompt(&self) -> u64 {
        self.input.max(self.cache_read).max(self.cache_write_5m).max(self.cache_write_1h)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    pub rates: Rates,
    /// Above this many prompt tokens, `long_rates` apply to the whole request.
    pub long_context: Option<(u64, Rates)>,
    /// Multiplier of every rate in fast mode.
    pub fast: f64,
    /// Multipliers by `inference_geo` value; unlisted values cost 1x.
    pub geo: Vec<(String, f64)>,
    /// Multiplier on a regional (not global) Bedrock or Vertex endpoint.
    pub regional: f64,
    /// Fee per web search, in nano-dollars.
    pub web_search_nanos: u64,
    /// Fee per web fetch, in nano-dollars.
    pub web_fetch_nanos: u64,
    pub max_output: u64,
    pub context_window: u64,
}

/// What a request asks for that changes its price, known before it is sent: what admission
/// reserves for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked<'a> {
    pub fast: bool,
    /// `inference_geo` as the request sets it.
    pub geo: Option<&'a str>,
    /// The deployment is a regional Bedrock or Vertex endpoint.
    pub regional: bool,
    /// The most web searches and fetches the request's server tools may make.
    pub web_searches: u64,
    pub web_fetches: u64,
}

/// USD per million tokens to nano-dollars per token.
fn nanos(usd_per_mtok: f64) -> u64 {
    (usd_per_mtok * 1000.0).round() as u64
}

/// USD per 1,000 uses to nano-dollars per use.
fn fee_nanos(usd_per_1k: f64) -> u64 {
    (usd_per_1k * 1e6).round() as u64
}

fn check_multiplier(what: &str, m: f64) -> Result<f64, String> {
    if m.is_finite() && m > 0.0 && m <= 100.0 {
        Ok(m)
    } else {
        Err(format!("{what} must be a multiplier above 0 and at most 100, not {m}"))
    }
}

fn check_usd(what: &str, usd: f64) -> Result<f64, String> {
    if usd.is_finite() && (0.0..=1e6).contains(&usd) {
        Ok(usd)
    } else {
        Err(format!("{what} must be a USD amount between 0 and 1e6, not {usd}"))
    }
}

impl Price {
    fn from_config(c: &PriceConfig, defaults: &PriceExtras) -> Result<Self, String> {
        let row = |e: String| format!("price {:?}: {e}", c.pattern);
        for (what, v) in [
            ("input", c.input),
            ("output", c.output),
            ("cache_read", c.cache_read),
            ("cache_write_5m", c.cache_write_5m),
            ("cache_write_1h", c.cache_write_1h),
        ] {
            check_usd(what, v).map_err(row)?;
        }
        let rates = Rates::from_usd(c.input, c.output, c.cache_read, c.cache_write_5m, c.cache_write_1h);
        let long_context = c.long_context.as_ref().map(|l: &LongContextConfig| {
            (l.threshold, Rates::from_usd(l.input, l.output, l.cache_read, l.cache_write_5m, l.cache_write_1h))
        });
        let x = c.extras(defaults);
        let mut geo = Vec::new();
        for (name, m) in x.geo.iter().flatten() {
            geo.push((name.clone(), check_multiplier(&format!("geo.{name}"), *m).map_err(row)?));
        }
        Ok(Price {
            rates,
            long_context,
            fast: check_multiplier("fast", x.fast.unwrap_or(1.0)).map_err(row)?,
            geo,
            regional: check_multiplier("regional", x.regional.unwrap_or(1.0)).map_err(row)?,
            web_search_nanos: fee_nanos(
                check_usd("web_search_per_1k", x.web_search_per_1k.unwrap_or(0.0)).map_err(row)?,
            ),
            web_fetch_nanos: fee_nanos(check_usd("web_fetch_per_1k", x.web_fetch_per_1k.unwrap_or(0.0)).map_err(row)?),
            max_output: x.max_output.unwrap_or(DEFAULT_MAX_OUTPUT).max(1),
            context_window: x.context_window.unwrap_or(DEFAULT_CONTEXT_WINDOW).max(1),
        })
    }

    /// This price's modifiers and limits, as config: what an override of it inherits.
    fn extras(&self) -> PriceExtras {
        PriceExtras {
            fast: Some(self.fast),
            geo: Some(self.geo.iter().cloned().collect()),
            regional: Some(self.regional),
            web_search_per_1k: Some(self.web_search_nanos as f64 / 1e6),
            web_fetch_per_1k: Some(self.web_fetch_nanos as f64 / 1e6),
            max_output: Some(self.max_output),
            context_window: Some(self.context_window),
        }
    }

    /// The token rates for a prompt of `prompt_tokens`, before multipliers.
    fn tier(&self, prompt_tokens: u64) -> Rates {
        match self.long_context {
            Some((threshold, long)) if prompt_tokens > threshold => long,
            _ => self.rates,
        }
    }

    fn geo_multiplier(&self, geo: &str) -> f64 {
        self.geo.iter().find(|(g, _)| g == geo).map_or(1.0, |(_, m)| *m)
    }

    /// The multiplier for a speed, a geography and the kind of endpoint, stacked.
    pub fn multiplier(&self, fast: bool, geo: &str, regional: bool) -> f64 {
        let mut m = 1.0;
        if fast {
            m *= self.fast;
        }
        m *= self.geo_multiplier(geo);
        if regional {
            m *= self.regional;
        }
        m
    }

    /// The cost of `usage` in nano-dollars: each token class at its own rate, scaled by what
    /// the usage says ran (speed, geography) and where (`regional`), plus server-tool fees.
    pub fn cost_nanos(&self, u: &Usage, regional: bool) -> u64 {
        let m = self.multiplier(u.speed == Speed::Fast, u.inference_geo.as_str(), regional);
        let r = self.tier(u.prompt_tokens()).scaled(m);
        // Saturating: absurd token counts from a broken upstream must not wrap or panic.
        [
            (u.input_tokens, r.input),
            (u.output_tokens, r.output),
            (u.cache_read_input_tokens, r.cache_read),
            (u.cache_creation_5m_input_tokens, r.cache_write_5m),
            (u.cache_creation_1h_input_tokens, r.cache_write_1h),
            (u.web_search_requests, self.web_search_nanos),
            (u.web_fetch_requests, self.web_fetch_nanos),
        ]
        .iter()
        .fold(0u64, |sum, (n, rate)| sum.saturating_add(n.saturating_mul(*rate)))
    }

    /// The most a request can cost with a prompt of at most `prompt_tokens` and at most
    /// `output_tokens` generated: every prompt token at the dearest prompt rate, at the
    /// long-context rates when the prompt may cross their threshold, scaled by what the request
    /// asks for, plus the fees of every server-tool use it allows.
    pub fn worst_case_nanos(&self, prompt_tokens: u64, output_tokens: u64, asked: &Asked) -> u64 {
        let m = self.multiplier(asked.fast, asked.geo.unwrap_or(""), asked.regional);
        let r = self.tier(prompt_tokens).scaled(m);
        prompt_tokens
            .saturating_mul(r.dearest_prompt())
            .saturating_add(output_tokens.saturating_mul(r.output))
            .saturating_add(asked.web_searches.saturating_mul(self.web_search_nanos))
            .saturating_add(asked.web_fetches.saturating_mul(self.web_fetch_nanos))
    }
}

/// Formats nano-dollars as a decimal USD amount without rounding.
pub fn usd(nanos: u64) -> String {
    let s = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Which provider a price is looked up for: rows may name a provider or a provider kind.
#[derive(Debug, Clone, Copy)]
pub struct ProviderRef<'a> {
    pub name: &'a str,
    pub kind: &'a str,
}

#[derive(Debug)]
struct Entry {
    provider: Option<String>,
    price: Arc<Price>,
}

impl Entry {
    fn serves(&self, p: Option<ProviderRef>) -> bool {
        match (&self.provider, p) {
            (None, _) => true,
            (Some(want), Some(p)) => want == p.name || want == p.kind,
            (Some(_), None) => false,
        }
    }
}

/// One source of rows: exact ids in a map, globs in file order.
#[derive(Debug, Default)]
struct Tier {
    exact: HashMap<String, Vec<Entry>>,
    patterns: Vec<(String, Entry)>,
}

impl Tier {
    fn add(&mut self, c: &PriceConfig, price: Price) {
        let entry = Entry { provider: c.provider.clone(), price: Arc::new(price) };
        if c.pattern.contains('*') {
            self.patterns.push((c.pattern.clone(), entry));
        } else {
            self.exact.entry(c.pattern.clone()).or_default().push(entry);
        }
    }

    /// An exact row for this provider, then an exact row for any provider, then the first
    /// glob (in file order) that matches and serves this provider.
    fn lookup(&self, provider: Option<ProviderRef>, model_id: &str) -> Option<&Arc<Price>> {
        if let Some(rows) = self.exact.get(model_id) {
            let specific = rows.iter().find(|e| e.provider.is_some() && e.serves(provider));
            if let Some(e) = specific.or_else(|| rows.iter().find(|e| e.provider.is_none())) {
                return Some(&e.price);
            }
        }
        self.patterns.iter().find(|(p, e)| e.serves(provider) && glob_match(p, model_id)).map(|(_, e)| &e.price)
    }
}

/// The operator's `[[price]]` rows over the shipped table. Lookup order: the operator's exact
/// ids, the operator's globs, the shipped exact ids, the shipped globs; within each, a row for
/// the provider before a row for any provider.
#[derive(Debug, Default)]
pub struct PriceTable {
    overrides: Tier,
    shipped: Tier,
}

impl PriceTable {
    pub fn with_overrides(overrides: &[PriceConfig]) -> Result<Self, String> {
        let shipped: PriceFile =
            toml::from_str(DEFAULT_PRICES).map_err(|e| format!("the shipped price table is invalid: {e}"))?;
        let mut table = PriceTable::default();
        for entry in &shipped.price {
            table.shipped.add(entry, Price::from_config(entry, &shipped.defaults)?);
        }
        for entry in overrides {
            // An override that re-prices a shipped model keeps that model's modifiers and
            // limits (Opus 4.6's 6x fast mode, say) unless it sets its own.
            let model = entry.pattern.replace('*', "");
            let inherited = table.shipped.lookup(None, &model).map(|p| p.extras());
            let defaults = inherited.as_ref().unwrap_or(&shipped.defaults);
            table.overrides.add(entry, Price::from_config(entry, defaults)?);
        }
        Ok(table)
    }

    /// Every exact model id the table prices (yours and the shipped ones): the models known to
    /// exist, for listing what a pattern route can serve.
    pub fn known_ids(&self) -> impl Iterator<Item = &str> {
        self.overrides.exact.keys().chain(self.shipped.exact.keys()).map(String::as_str)
    }

    pub fn lookup(&self, provider: Option<ProviderRef>, model_id: &str) -> Option<Arc<Price>> {
        self.overrides.lookup(provider, model_id).or_else(|| self.shipped.lookup(provider, model_id)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64, output: f64) -> PriceConfig {
        PriceConfig {
            pattern: "m".into(),
            input,
            output,
            cache_read: input / 10.0,
            cache_write_5m: input * 1.25,
            cache_write_1h: input * 2.0,
            long_context: None,
            provider: None,
            fast: None,
            geo: None,
            regional: None,
            web_search_per_1k: None,
            web_fetch_per_1k: None,
            max_output: None,
            context_window: None,
        }
    }

    fn priced(c: &PriceConfig) -> Price {
        Price::from_config(c, &PriceExtras::default()).unwrap()
    }

    #[test]
    fn each_class_at_its_own_rate() {
        let p = priced(&price(3.0, 15.0));
        let u = Usage {
            input_tokens: 1000,
            output_tokens: 2000,
            cache_read_input_tokens: 10_000,
            cache_creation_input_tokens: 3000,
            cache_creation_5m_input_tokens: 1000,
            cache_creation_1h_input_tokens: 2000,
            ..Default::default()
        };
        // 1000*3 + 2000*15 + 10000*0.3 + 1000*3.75 + 2000*6 (USD per million) = 51.75e-3 USD
        assert_eq!(p.cost_nanos(&u, false), 51_750_000);
        assert_eq!(usd(p.cost_nanos(&u, false)), "0.05175");
    }

    #[test]
    fn long_context_tier_applies_to_whole_request() {
        let mut c = price(3.0, 15.0);
        c.long_context = Some(LongContextConfig {
            threshold: 200_000,
            input: 6.0,
            output: 22.5,
            cache_read: 0.6,
            cache_write_5m: 7.5,
            cache_write_1h: 12.0,
        });
        let p = priced(&c);
        let small = Usage { input_tokens: 200_000, output_tokens: 1, ..Default::default() };
        let big = Usage { input_tokens: 200_001, output_tokens: 1, ..Default::default() };
        assert_eq!(p.cost_nanos(&small, false), 200_000 * 3000 + 15_000);
        assert_eq!(p.cost_nanos(&big, false), 200_001 * 6000 + 22_500);
    }

    #[test]
    fn worst_case_bounds_every_split() {
        let p = priced(&price(3.0, 15.0));
        let worst = p.worst_case_nanos(1000, 100, &Asked::default());
        assert_eq!(worst, 1000 * 6000 + 100 * 15_000);
        for (input, w5, w1, read) in
            [(1000, 0, 0, 0), (0, 1000, 0, 0), (0, 0, 1000, 0), (0, 0, 0, 1000), (400, 300, 200, 100)]
        {
            let u = Usage {
                input_tokens: input,
                output_tokens: 100,
                cache_read_input_tokens: read,
                cache_creation_input_tokens: w5 + w1,
                cache_creation_5m_input_tokens: w5,
                cache_creation_1h_input_tokens: w1,
                ..Default::default()
            };
            assert!(p.cost_nanos(&u, false) <= worst);
        }
    }

    #[test]
    fn overrides_win_and_shipped_table_parses() {
        let mut o = price(1.0, 2.0);
        o.pattern = "claude-sonnet-4-5-20250929".into();
        let t = PriceTable::with_overrides(&[o]).unwrap();
        assert_eq!(t.lookup(None, "claude-sonnet-4-5-20250929").unwrap().rates.input, 1000);
        assert!(t.lookup(None, "no-such-model").is_none());
    }

    #[test]
    fn an_override_glob_wins_over_a_shipped_exact_id() {
        let mut o = price(1.0, 2.0);
        o.pattern = "*claude-sonnet-4-5*".into();
        let t = PriceTable::with_overrides(&[o]).unwrap();
        assert_eq!(t.lookup(None, "claude-sonnet-4-5-20250929").unwrap().rates.input, 1000);
    }

    #[test]
    fn an_override_keeps_the_shipped_modifiers_it_does_not_set() {
        let mut o = price(6.0, 30.0);
        o.pattern = "claude-opus-4-6".into();
        let t = PriceTable::with_overrides(&[o]).unwrap();
        let p = t.lookup(None, "claude-opus-4-6").unwrap();
        assert_eq!((p.rates.input, p.fast, p.max_output), (6000, 6.0, 128_000));
        let mut old = price(15.0, 75.0);
        old.pattern = "*claude-opus-4-1*".into();
        let t = PriceTable::with_overrides(&[old]).unwrap();
        let p = t.lookup(None, "claude-opus-4-1-20250805").unwrap();
        assert_eq!((p.regional, p.max_output), (1.0, 32_000));
    }

    #[test]
    fn a_row_for_the_provider_wins_over_a_row_for_any() {
        let mut any = price(1.0, 2.0);
        any.pattern = "x".into();
        let mut bedrock = price(5.0, 2.0);
        bedrock.pattern = "x".into();
        bedrock.provider = Some("bedrock".into());
        let t = PriceTable::with_overrides(&[any, bedrock]).unwrap();
        let on = |kind| t.lookup(Some(ProviderRef { name: "p", kind }), "x").unwrap().rates.input;
        assert_eq!((on("bedrock"), on("anthropic")), (5000, 1000));
        assert_eq!(t.lookup(None, "x").unwrap().rates.input, 1000);
    }

    #[test]
    fn modifiers_stack_on_every_class_and_fees_add() {
        let mut c = price(5.0, 25.0);
        c.fast = Some(6.0);
        c.geo = Some([("us".to_string(), 1.1)].into_iter().collect());
        c.regional = Some(1.1);
        c.web_search_per_1k = Some(10.0);
        let p = priced(&c);
        let u = Usage {
            input_tokens: 1000,
            output_tokens: 100,
            cache_creation_input_tokens: 10,
            cache_creation_1h_input_tokens: 10,
            speed: Speed::Fast,
            inference_geo: crate::protocol::usage::Tag::new("us"),
            web_search_requests: 3,
            ..Default::default()
        };
        // Every rate x 6 x 1.1, rounded per rate: input 5000 -> 33000, output 25000 -> 165000,
        // 1h write 10000 -> 66000; regional once more: 36300, 181500, 72600. Searches $0.01 each.
        assert_eq!(p.cost_nanos(&u, false), 1000 * 33_000 + 100 * 165_000 + 10 * 66_000 + 3 * 10_000_000);
        assert_eq!(p.cost_nanos(&u, true), 1000 * 36_300 + 100 * 181_500 + 10 * 72_600 + 3 * 10_000_000);
        let asked = Asked { fast: true, geo: Some("us"), regional: false, web_searches: 5, web_fetches: 0 };
        assert_eq!(p.worst_case_nanos(1000, 100, &asked), 1000 * 66_000 + 100 * 165_000 + 5 * 10_000_000);
    }
}
