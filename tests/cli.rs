//! The `tollgate` command line: check, keys, and config errors with their position.

use std::process::Command;

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate")).args(args).env_remove("ANTHROPIC_API_KEY").output().unwrap()
}

#[test]
fn shipped_config_checks_and_prints_routes() {
    let out = tollgate(&["check", concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.toml")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("claude-sonnet-5 (aliases: sonnet)"), "{stdout}");
    assert!(stdout.contains("1. anthropic -> claude-haiku-4-5-20251001 [priced]"), "{stdout}");
    assert!(stdout.contains("ANTHROPIC_API_KEY is not set"), "{stdout}");
}

#[test]
fn typo_in_config_fails_with_file_line_column_and_field_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.toml")).unwrap();
    let bad = shipped.replacen("first_byte_timeout", "first_byte_timout", 1);
    let line = bad.lines().position(|l| l.starts_with("first_byte_timout")).unwrap() + 1;
    std::fs::write(&path, bad).unwrap();
    let out = tollgate(&["check", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:{line}:1: unknown field `first_byte_timout`", path.display());
    assert!(stderr.contains(&expected), "{stderr:?} should contain {expected:?}");
}

#[test]
fn keys_new_prints_a_key_and_its_hash() {
    let out = tollgate(&["keys", "new"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| stdout.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap();
    let (key, hash) = (field("key:"), field("hash:"));
    assert!(key.starts_with("tg-"));
    assert_eq!(tollgate::auth::parse_key_hash(&hash).unwrap(), tollgate::auth::hash_key(key.as_bytes()));
}

#[test]
fn help_is_everywhere() {
    for args in [&["--help"][..], &["run", "--help"], &["check", "--help"], &["keys", "new", "--help"]] {
        let out = tollgate(args);
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{args:?}");
    }
}
