//! Prices per token class, looked up by exact model id, then by glob in order.
//!
//! Money is integer nano-dollars: a price of $X per million tokens is X*1000 nano-dollars per
//! token, exact for every published price (they have at most three decimals per million), so
//! costs add up without floating-point drift.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{LongContextConfig, PriceConfig, PriceFile};
use crate::protocol::usage::Usage;
use crate::routing::glob_match;

/// The table that ships with Tollgate (see the file for its source and date).
pub const DEFAULT_PRICES: &str = include_str!("default_prices.toml");

/// Nano-dollars per token for each class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub rates: Rates,
    /// Above this many prompt tokens, `long_rates` apply to the whole request.
    pub long_context: Option<(u64, Rates)>,
}

/// USD per million tokens to nano-dollars per token.
fn nanos(usd_per_mtok: f64) -> u64 {
    (usd_per_mtok * 1000.0).round() as u64
}

impl Price {
    fn from_config(c: &PriceConfig) -> Self {
        let rates = Rates {
            input: nanos(c.input),
            output: nanos(c.output),
            cache_read: nanos(c.cache_read),
            cache_write_5m: nanos(c.cache_write_5m),
            cache_write_1h: nanos(c.cache_write_1h),
        };
        let long_context = c.long_context.as_ref().map(|l: &LongContextConfig| {
            (
                l.threshold,
                Rates {
                    input: nanos(l.input),
                    output: nanos(l.output),
                    cache_read: nanos(l.cache_read),
                    cache_write_5m: nanos(l.cache_write_5m),
                    cache_write_1h: nanos(l.cache_write_1h),
                },
            )
        });
        Price { rates, long_context }
    }

    /// The cost of `usage` in nano-dollars, each class at its own rate.
    pub fn cost_nanos(&self, u: &Usage) -> u64 {
        let r = match self.long_context {
            Some((threshold, long)) if u.prompt_tokens() > threshold => long,
            _ => self.rates,
        };
        // Saturating: absurd token counts from a broken upstream must not wrap or panic.
        [
            (u.input_tokens, r.input),
            (u.output_tokens, r.output),
            (u.cache_read_input_tokens, r.cache_read),
            (u.cache_creation_5m_input_tokens, r.cache_write_5m),
            (u.cache_creation_1h_input_tokens, r.cache_write_1h),
        ]
        .iter()
        .fold(0u64, |sum, (tokens, rate)| sum.saturating_add(tokens.saturating_mul(*rate)))
    }
}

impl Price {
    /// The most a request can cost with a prompt of at most `prompt_tokens` and at most
    /// `output_tokens` generated: every prompt token at the dearest prompt rate (usually a
    /// 1-hour cache write), at the long-context rates when the prompt may cross their threshold.
    pub fn worst_case_nanos(&self, prompt_tokens: u64, output_tokens: u64) -> u64 {
        let r = match self.long_context {
            Some((threshold, long)) if prompt_tokens > threshold => long,
            _ => self.rates,
        };
        let prompt_rate = r.input.max(r.cache_read).max(r.cache_write_5m).max(r.cache_write_1h);
        prompt_tokens.saturating_mul(prompt_rate).saturating_add(output_tokens.saturating_mul(r.output))
    }
}

/// Formats nano-dollars as a decimal USD amount without rounding.
pub fn usd(nanos: u64) -> String {
    let s = format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[derive(Debug, Default)]
pub struct PriceTable {
    exact: HashMap<String, Arc<Price>>,
    patterns: Vec<(String, Arc<Price>)>,
}

impl PriceTable {
    /// The shipped table with `overrides` on top: an override for an exact id replaces the
    /// shipped one, and override patterns are tried before shipped ones.
    pub fn with_overrides(overrides: &[PriceConfig]) -> Result<Self, String> {
        let shipped: PriceFile =
            toml::from_str(DEFAULT_PRICES).map_err(|e| format!("the shipped price table is invalid: {e}"))?;
        let mut table = PriceTable::default();
        for entry in overrides.iter().chain(shipped.price.iter()) {
            let price = Arc::new(Price::from_config(entry));
            if entry.pattern.contains('*') {
                table.patterns.push((entry.pattern.clone(), price));
            } else {
                table.exact.entry(entry.pattern.clone()).or_insert(price);
            }
        }
        Ok(table)
    }

    pub fn lookup(&self, model_id: &str) -> Option<Arc<Price>> {
        self.exact
            .get(model_id)
            .or_else(|| self.patterns.iter().find(|(p, _)| glob_match(p, model_id)).map(|(_, p)| p))
            .cloned()
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
        }
    }

    #[test]
    fn each_class_at_its_own_rate() {
        let p = Price::from_config(&price(3.0, 15.0));
        let u = Usage {
            input_tokens: 1000,
            output_tokens: 2000,
            cache_read_input_tokens: 10_000,
            cache_creation_input_tokens: 3000,
            cache_creation_5m_input_tokens: 1000,
            cache_creation_1h_input_tokens: 2000,
        };
        // 1000*3 + 2000*15 + 10000*0.3 + 1000*3.75 + 2000*6 (USD per million) = 51.75e-3 USD
        assert_eq!(p.cost_nanos(&u), 51_750_000);
        assert_eq!(usd(p.cost_nanos(&u)), "0.05175");
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
        let p = Price::from_config(&c);
        let small = Usage { input_tokens: 200_000, output_tokens: 1, ..Default::default() };
        let big = Usage { input_tokens: 200_001, output_tokens: 1, ..Default::default() };
        assert_eq!(p.cost_nanos(&small), 200_000 * 3000 + 15_000);
        assert_eq!(p.cost_nanos(&big), 200_001 * 6000 + 22_500);
    }

    #[test]
    fn worst_case_bounds_every_split() {
        let p = Price::from_config(&price(3.0, 15.0));
        let worst = p.worst_case_nanos(1000, 100);
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
            };
            assert!(p.cost_nanos(&u) <= worst);
        }
    }

    #[test]
    fn overrides_win_and_shipped_table_parses() {
        let mut o = price(1.0, 2.0);
        o.pattern = "claude-sonnet-4-5-20250929".into();
        let t = PriceTable::with_overrides(&[o]).unwrap();
        assert_eq!(t.lookup("claude-sonnet-4-5-20250929").unwrap().rates.input, 1000);
        assert!(t.lookup("no-such-model").is_none());
    }
}
