//! Which `anthropic-beta` values a provider gets: Bedrock and Vertex accept fewer betas than the
//! Anthropic API, and reject a request that names one they do not know. The policy is data, per
//! provider: betas to drop (globs) and betas to rename.

use crate::config::{BetaPolicyConfig, ProviderKind};
use crate::glob::glob_match;

/// Betas that, as far as Anthropic's feature pages said when this was written (2026-11), only
/// the Anthropic API offers: the Files API, the MCP connector, server-side code execution and
/// Agent Skills. Dropped for Bedrock and Vertex unless the provider's `betas` says otherwise.
/// Check them against the provider's own documentation before relying on them.
pub const FIRST_PARTY_ONLY: &[&str] = &["files-api-*", "mcp-client-*", "code-execution-*", "skills-*"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BetaPolicy {
    pub drop: Vec<String>,
    pub rename: Vec<(String, String)>,
}

impl BetaPolicy {
    pub fn from_config(kind: ProviderKind, c: Option<&BetaPolicyConfig>) -> Self {
        let default_drop: Vec<String> = match kind {
            ProviderKind::Anthropic => Vec::new(),
            ProviderKind::Bedrock | ProviderKind::Vertex => FIRST_PARTY_ONLY.iter().map(|s| s.to_string()).collect(),
        };
        match c {
            None => BetaPolicy { drop: default_drop, rename: Vec::new() },
            Some(c) => BetaPolicy {
                drop: c.drop.clone().unwrap_or(default_drop),
                rename: c.rename.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.drop.is_empty() && self.rename.is_empty()
    }

    /// The betas to send, comma-joined, and the rule that dropped each beta it dropped.
    pub fn apply(&self, betas: &str) -> (String, Vec<String>) {
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for beta in betas.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            if let Some(rule) = self.drop.iter().find(|g| glob_match(g, beta)) {
                dropped.push(rule.clone());
                continue;
            }
            match self.rename.iter().find(|(from, _)| from == beta) {
                Some((_, to)) => kept.push(to.as_str()),
                None => kept.push(beta),
            }
        }
        (kept.join(","), dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_and_renames() {
        let p = BetaPolicy::from_config(ProviderKind::Bedrock, None);
        assert_eq!(
            p.apply("interleaved-thinking-2025-05-14, files-api-2025-04-14,context-1m-2025-08-07"),
            ("interleaved-thinking-2025-05-14,context-1m-2025-08-07".to_string(), vec!["files-api-*".to_string()])
        );
        assert!(BetaPolicy::from_config(ProviderKind::Anthropic, None).is_empty());
        let c = BetaPolicyConfig { drop: Some(vec![]), rename: [("a".to_string(), "b".to_string())].into() };
        assert_eq!(
            BetaPolicy::from_config(ProviderKind::Vertex, Some(&c)).apply("a,files-api-x"),
            ("b,files-api-x".into(), vec![])
        );
    }
}
