//! AWS Signature Version 4 for Bedrock, with the official `aws-sigv4` crate: this module only
//! feeds it the request and collects the headers it adds (`x-amz-date`, `authorization`,
//! `x-amz-security-token`).

use std::sync::Arc;
use std::time::SystemTime;

use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;

use super::aws::{AwsCredentials, AwsSource};
#[cfg(test)]
use crate::config::Secret;

/// Signs for one region with the credentials held (fixed, or renewed in the background).
pub struct AwsSigner {
    pub region: String,
    pub service: &'static str,
    pub credentials: Arc<AwsCredentials>,
}

impl std::fmt::Debug for AwsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSigner").field("region", &self.region).field("credentials", &self.credentials).finish()
    }
}

impl AwsSigner {
    pub fn new(source: AwsSource) -> Self {
        AwsSigner {
            region: source.region.clone(),
            service: "bedrock",
            credentials: Arc::new(AwsCredentials::new(source)),
        }
    }

    /// The secret material, for telling a rotated key from the same one (never logged).
    pub fn fingerprint_material(&self) -> Vec<u8> {
        self.credentials.source.fingerprint_material()
    }

    /// The headers that sign a request: `url` is the full URL (scheme, host, path, query);
    /// `headers` are those to sign along (`host` at least).
    pub fn sign(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        time: SystemTime,
    ) -> Result<Vec<(String, String)>, String> {
        self.sign_hashed(method, url, headers, &payload_hash(body), time)
    }

    /// As [`AwsSigner::sign`], with the body's SHA-256 (lowercase hex) already known: a body sent
    /// to several endpoints is hashed once, however large.
    pub fn sign_hashed(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        payload_sha256: &str,
        time: SystemTime,
    ) -> Result<Vec<(String, String)>, String> {
        let identity = self.credentials.identity()?;
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(time)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("SigV4 parameters: {e}"))?
            .into();
        let body = SignableBody::Precomputed(payload_sha256.to_string());
        let request = SignableRequest::new(method, url, headers.iter().copied(), body)
            .map_err(|e| format!("SigV4 cannot sign this request: {e}"))?;
        let (instructions, _) = sign(request, &params).map_err(|e| format!("SigV4 signing failed: {e}"))?.into_parts();
        Ok(instructions.headers().map(|(n, v)| (n.to_string(), v.to_string())).collect())
    }
}

/// A request body's SHA-256 as SigV4 signs it (lowercase hex).
pub fn payload_hash(body: &[u8]) -> String {
    payload_hash_of([body])
}

/// The SHA-256 of a body written in pieces, as of the pieces joined.
pub fn payload_hash_of<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for piece in pieces {
        hasher.update(piece);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_in_pieces_hashes_as_the_body_joined() {
        let body = br#"{"model":"claude-sonnet-4-5-20250929","messages":[]}"#;
        assert_eq!(payload_hash_of([&body[..9], &body[9..37], &body[37..]]), payload_hash(body));
        // SHA-256 of nothing, as AWS documents it for an empty payload.
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(payload_hash_of(std::iter::empty::<&[u8]>()), empty);
        assert_eq!(payload_hash(b""), empty);
    }

    /// AWS's published SigV4 test suite (the copy shipped in the aws-sigv4 crate,
    /// `aws-signing-test-suite/v4`): credentials, region, service and time of every case.
    fn signer(token: Option<&str>) -> AwsSigner {
        let source = AwsSource::fixed_for_tests(
            "us-east-1",
            Secret::for_tests("AKIDEXAMPLE"),
            Secret::for_tests("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            token.map(Secret::for_tests),
        );
        let mut s = AwsSigner::new(source);
        s.service = "service";
        s
    }

    fn time() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160) // 2015-08-30T12:36:00Z
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
        h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name} in {h:?}"))
    }

    #[test]
    fn post_vanilla() {
        let h = signer(None)
            .sign("POST", "https://example.amazonaws.com/", &[("host", "example.amazonaws.com")], b"", time())
            .unwrap();
        assert_eq!(header(&h, "x-amz-date"), "20150830T123600Z");
        assert_eq!(
            header(&h, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn get_vanilla_with_session_token() {
        let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
        let h = signer(Some(token))
            .sign("GET", "https://example.amazonaws.com/", &[("host", "example.amazonaws.com")], b"", time())
            .unwrap();
        assert_eq!(header(&h, "x-amz-security-token"), token);
        assert_eq!(
            header(&h, "authorization"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date;x-amz-security-token, \
             Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"
        );
    }

    #[test]
    fn the_body_is_signed() {
        let s = signer(None);
        let sign = |body: &[u8]| {
            let h =
                s.sign("POST", "https://example.amazonaws.com/", &[("host", "example.amazonaws.com")], body, time());
            header(&h.unwrap(), "authorization").to_string()
        };
        assert_ne!(sign(b"{\"a\":1}"), sign(b"{\"a\":2}"));
    }
}
