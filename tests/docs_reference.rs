//! The reference cannot drift from the code: every field of every config table is documented in
//! the section of `docs/` that describes that table, and every metric the gateway registers is
//! listed in `docs/observability.md`. A field or a metric added without its documentation
//! fails here, naming what is missing and where it belongs.

use std::collections::BTreeMap;
use std::path::Path;

/// Each config struct and where it is documented: the page and the heading of its section (the
/// section runs to the next heading of the same or a higher level).
const SECTIONS: &[(&str, &str, &str)] = &[
    ("ServerConfig", "configuration.md", "## `[server]`"),
    ("ListenerConfig", "configuration.md", "## `[[listener]]` (at least one)"),
    ("TlsConfig", "configuration.md", "## `[[listener]]` (at least one)"),
    ("AdminConfig", "configuration.md", "## `[admin]`"),
    ("StoreConfig", "configuration.md", "## `[store]`"),
    ("ControlsConfig", "configuration.md", "## `[controls]`"),
    ("OwnerConfig", "configuration.md", "## `[[team]]` and `[[user]]`"),
    ("BudgetConfig", "configuration.md", "## `[[team]]` and `[[user]]`"),
    ("AuditConfig", "configuration.md", "## `[audit]`"),
    ("EgressConfig", "configuration.md", "## `[egress]`"),
    ("TelemetryConfig", "configuration.md", "## `[telemetry]`"),
    ("AlertsConfig", "configuration.md", "## `[alerts]`"),
    ("WebhookConfig", "configuration.md", "## `[alerts]`"),
    ("LimitsConfig", "configuration.md", "## `[limits]`"),
    ("ProviderConfig", "configuration.md", "## `[[provider]]`"),
    ("AwsCredentialsConfig", "configuration.md", "## `[[provider]]`"),
    ("EndpointConfig", "configuration.md", "## `[[provider]]`"),
    ("HealthConfig", "configuration.md", "## `[[provider]]`"),
    ("BetaPolicyConfig", "configuration.md", "## `[[provider]]`"),
    ("ModelConfig", "configuration.md", "## `[[model]]`"),
    ("DeploymentConfig", "configuration.md", "## `[[model]]`"),
    ("KeyConfig", "configuration.md", "## `[[key]]`"),
    ("PriceConfig", "configuration.md", "## `[[price]]`"),
    ("LongContextConfig", "configuration.md", "## `[[price]]`"),
    ("PriceExtras", "configuration.md", "## `[[price]]`"),
    ("JwtIssuerConfig", "keys-and-jwt.md", "# JWT credentials (apiKeyHelper)"),
    ("JwtSecretConfig", "keys-and-jwt.md", "# JWT credentials (apiKeyHelper)"),
    ("JwtPublicKeyConfig", "keys-and-jwt.md", "# JWT credentials (apiKeyHelper)"),
    ("SsoConfig", "sso.md", "## `[sso]`"),
    ("SsoGroupConfig", "sso.md", "## `[sso]`"),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The TOML names of each config struct's fields, read from the schema's source: `pub` fields,
/// renamed by `#[serde(rename = "…")]` where the schema says so.
fn schema_fields() -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for file in ["src/config/mod.rs", "src/config/budget.rs", "src/config/sso.rs"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let mut current: Option<String> = None;
        let mut rename: Option<String> = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("pub struct ") {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
                current = rest.contains('{').then_some(name);
                continue;
            }
            if line == "}" {
                current = None;
                continue;
            }
            let Some(current) = &current else { continue };
            if let Some(r) = line.split("rename = \"").nth(1) {
                rename = r.split('"').next().map(str::to_string);
                continue;
            }
            if let Some(field) = line.strip_prefix("pub ").and_then(|f| f.split(':').next()) {
                let name = rename.take().unwrap_or_else(|| field.trim().to_string());
                out.entry(current.clone()).or_insert_with(Vec::new).push(name);
            }
        }
    }
    out
}

/// The text of a section: from its heading to the next heading of the same or a higher level.
fn section(page: &str, heading: &str) -> String {
    let text = std::fs::read_to_string(root().join("docs").join(page)).unwrap();
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = text.find(&format!("{heading}\n")).unwrap_or_else(|| panic!("docs/{page} has no heading {heading:?}"));
    let body = &text[start + heading.len()..];
    // Lines in code blocks (TOML comments) are not headings.
    let mut in_code = false;
    let end = body
        .lines()
        .scan(0, |at, line| {
            let here = *at;
            *at += line.len() + 1;
            Some((here, line))
        })
        .find(|(_, line)| {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            let hashes = line.chars().take_while(|c| *c == '#').count();
            !in_code && hashes > 0 && hashes <= level && line.chars().nth(hashes) == Some(' ')
        })
        .map_or(body.len(), |(at, _)| at);
    body[..end].to_string()
}

#[test]
fn every_config_field_is_documented_where_its_table_is() {
    let fields = schema_fields();
    let mut missing = Vec::new();
    for (name, page, heading) in SECTIONS {
        let text = section(page, heading);
        let Some(list) = fields.get(*name) else {
            missing.push(format!("the schema has no struct {name} (update tests/docs_reference.rs)"));
            continue;
        };
        for field in list {
            // Documented in a table (`field`) or in a TOML example (`field =`).
            if !text.contains(&format!("`{field}`")) && !text.contains(&format!("{field} =")) {
                missing.push(format!("{name}.{field}: not in docs/{page}, section {heading:?}"));
            }
        }
    }
    let documented: Vec<&str> = SECTIONS.iter().map(|(n, _, _)| *n).collect();
    for name in fields.keys() {
        if name.ends_with("Config") && name != "Config" && !documented.contains(&name.as_str()) {
            missing.push(format!("{name}: a config table with no section in tests/docs_reference.rs"));
        }
    }
    assert!(missing.is_empty(), "undocumented:\n{}", missing.join("\n"));
}

#[test]
fn every_metric_is_listed() {
    // Every metric name the code registers: the `"tollgate_…"` literals of src/metrics.rs (a
    // vector with no sample yet would not show in a scrape).
    let code = std::fs::read_to_string(root().join("src/metrics.rs")).unwrap();
    let names: Vec<&str> = code
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("tollgate_") && s.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(names.len() > 20, "found only {names:?}");
    let page = std::fs::read_to_string(root().join("docs/observability.md")).unwrap();
    let missing: Vec<&&str> = names.iter().filter(|name| !page.contains(&format!("`{name}`"))).collect();
    assert!(missing.is_empty(), "metrics not in docs/observability.md: {missing:?}");
}
