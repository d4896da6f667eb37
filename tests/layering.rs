//! The modules form layers, and imports point down only: each top-level module of `src/` may
//! use (through `crate::` paths, outside its tests) only the modules listed for it below, and
//! the whole graph has no cycle. A new dependency is a deliberate edit of this table; see
//! docs/architecture.md, "Layout", for the picture.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module and the modules it may import, from the bottom layer up.
const ALLOWED: &[(&str, &[&str])] = &[
    // Pure building blocks: no domain imports at all.
    ("glob", &[]),
    ("protocol", &[]),
    ("config", &[]),
    ("blocking", &[]),
    ("background", &[]),
    ("metrics", &[]),
    // Money, then what is counted and where it goes.
    ("metering", &["config", "glob", "protocol"]),
    ("limits", &["blocking", "config", "metering", "metrics"]),
    ("providers", &["config", "glob"]),
    ("store", &["background", "blocking", "config", "limits", "metering", "metrics"]),
    ("auth", &["config", "glob", "limits", "store"]),
    // Sign-in with the identity provider: gateway tokens over keys' principals.
    ("sso", &["auth", "config", "limits", "store"]),
    ("routing", &["config", "glob", "limits", "metering", "providers"]),
    ("tls", &["config"]),
    // The audit line writes the usage record's own types (protocol's `Usage`).
    ("audit", &["background", "config", "metering", "protocol"]),
    ("telemetry", &["background", "config", "metering"]),
    ("connections", &[]),
    ("mock", &["protocol"]),
    // The live state, then what serves it.
    (
        "runtime",
        &["audit", "auth", "config", "limits", "metering", "metrics", "providers", "routing", "sso", "store", "tls"],
    ),
    (
        "proxy",
        &[
            "audit",
            "auth",
            "config",
            "limits",
            "metering",
            "metrics",
            "protocol",
            "providers",
            "routing",
            "runtime",
            "sso",
            "store",
            "telemetry",
        ],
    ),
    (
        "admin",
        &["audit", "auth", "config", "limits", "metering", "metrics", "providers", "routing", "runtime", "store"],
    ),
    ("cli", &["config"]),
    // The engineer's side of sign-in: an HTTP client of the gateway, nothing more.
    ("login", &[]),
    ("refresh", &["auth", "providers", "runtime"]),
    ("alerts", &["background", "config", "limits", "metering", "metrics", "runtime", "store"]),
    (
        "server",
        &[
            "admin",
            "alerts",
            "audit",
            "config",
            "connections",
            "limits",
            "metrics",
            "providers",
            "proxy",
            "refresh",
            "runtime",
            "store",
            "telemetry",
            "tls",
        ],
    ),
];

/// The top-level modules each module's non-test code names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs");
            if matches!(top, "main" | "lib" | "bin") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests may reach anywhere: they are not part of the layer.
            let code = text.split("#[cfg(test)]").next().unwrap();
            let deps = graph.entry(top.to_string()).or_default();
            for name in crate_paths(code) {
                if name != top {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// The first segment of every `crate::name` and of every item in `crate::{a, b::{c, d}}`.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        // The items at the group's top level, each up to a comma at depth 0.
        let (mut depth, mut item_start) = (0usize, 0usize);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.push(ident(group[item_start..i].trim()));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(ident(group[item_start..i].trim()));
                    item_start = i + 1;
                }
                _ => {}
            }
        }
    }
    out.retain(|name| !name.is_empty());
    out
}

#[test]
fn every_import_points_down_a_layer() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> =
        ALLOWED.iter().map(|(m, deps)| (*m, deps.iter().copied().collect())).collect();
    let mut wrong = Vec::new();
    for (module, deps) in imports() {
        let Some(may) = allowed.get(module.as_str()) else {
            wrong.push(format!("module {module} is not in the layer table of tests/layering.rs"));
            continue;
        };
        for d in deps {
            if !may.contains(d.as_str()) {
                wrong.push(format!("{module} imports {d}, which its layer may not"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_table_itself_has_no_cycle() {
    // Depth-first search over the allowed edges: the real imports are a subset of them.
    let graph: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, &'a [&'a str]>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(node) {
            return;
        }
        assert!(!path.contains(&node), "an import cycle: {} -> {node}", path.join(" -> "));
        path.push(node);
        for next in graph.get(node).copied().unwrap_or_default() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node);
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_scanner_sees_grouped_imports() {
    let code = "use crate::{auth::{A, B}, limits::C};\nlet x = crate::metrics::M;";
    assert_eq!(crate_paths(code), ["auth", "limits", "metrics"]);
}
