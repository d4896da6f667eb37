//! Secrets in the config are references, never values: `env:NAME` or `file:PATH`.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl SecretRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("env:") {
            if name.is_empty() {
                return Err("`env:` needs a variable name".into());
            }
            Ok(SecretRef::Env(name.to_string()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("`file:` needs a path".into());
            }
            Ok(SecretRef::File(PathBuf::from(path)))
        } else {
            // Never echo the value: it may be a pasted secret.
            Err("a secret must be a reference, `env:NAME` or `file:PATH`, not a literal value".into())
        }
    }

    /// Reads the secret now. The error names the reference, never the value.
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            SecretRef::Env(name) => match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_string())),
                Ok(_) => Err(format!("environment variable {name} is empty")),
                Err(_) => Err(format!("environment variable {name} is not set")),
            },
            SecretRef::File(path) => match std::fs::read_to_string(path) {
                Ok(v) if !v.trim().is_empty() => Ok(Secret(v.trim().to_string())),
                Ok(_) => Err(format!("secret file {} is empty", path.display())),
                Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
            },
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(n) => write!(f, "env:{n}"),
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SecretRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A resolved secret. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A secret from a literal, for tests only: the config never holds literals.
    #[cfg(test)]
    pub fn for_tests(value: &str) -> Self {
        Secret(value.to_string())
    }

    /// A secret read from a standard environment variable (AWS's, for instance) rather than
    /// from a reference in the config.
    pub fn from_env(name: &str) -> Result<Self, String> {
        SecretRef::Env(name.to_string()).resolve()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_is_refused_without_echo() {
        let e = SecretRef::parse("sk-ant-api03-xyz").unwrap_err();
        assert!(!e.contains("sk-ant"));
    }

    #[test]
    fn debug_redacts() {
        assert_eq!(format!("{:?}", Secret("sk-ant-123".into())), "Secret(<redacted>)");
    }
}
