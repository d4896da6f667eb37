//! JWT credentials against the real gateway: every key family (HMAC secrets from env and file,
//! RSA, EC and Ed25519 PEM files, a JWKS URL that rotates), every way a token is refused with
//! its reason counted, and JWT principals governed by team and user budgets and limits.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The shared secret of the `helper` issuers (at least 32 bytes).
const SECRET: &str = "tollgate-test-hmac-secret-0123456789abcdef";
/// A secret of the right size that no issuer knows.
const OTHER_SECRET: &str = "another-hmac-secret-nobody-trusts-0123456789";
const SECRET_ENV: &str = "TG_TEST_JWT_SECRET";

/// Shipped price of this id: $6 per million 1-hour cache writes and $15 per million output
/// tokens, in nano-dollars per token (as in tests/controls.rs).
const MODEL_ID: &str = "claude-sonnet-4-5-20250929";
const PROMPT_RATE: u64 = 6000;
const OUTPUT_RATE: u64 = 15_000;
const OVERHEAD: u64 = 1024;
const MAX_TOKENS: u64 = 100;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims of a valid token for `user` of `team`; every call gives a distinct token (`jti`), so
/// the gateway's cache of verified tokens never answers for it.
fn claims(user: &str, team: &str) -> Value {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let t = now();
    json!({
        "user": user,
        "team": team,
        "iat": t,
        "exp": t + 600,
        "jti": format!("t{}", SERIAL.fetch_add(1, Ordering::Relaxed)),
    })
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            claims.as_object_mut().unwrap().remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn mint(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hmac(secret: &str) -> EncodingKey {
    EncodingKey::from_secret(secret.as_bytes())
}

/// A token with `alg: none` and an empty signature, built by hand.
fn unsigned_token(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", b64url(claims.to_string().as_bytes()))
}

/// An RSA key pair made by the `openssl` command line: (private PKCS#8 PEM, public PEM path).
fn rsa_key(dir: &Path, name: &str) -> (Vec<u8>, PathBuf) {
    let private = dir.join(format!("{name}.key.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&private)
        .stderr(Stdio::null())
        .status()
        .expect("the openssl command line")
        .success();
    assert!(ok, "openssl genpkey");
    let ok =
        Command::new("openssl").arg("pkey").arg("-in").arg(&private).arg("-pubout").arg("-out").arg(&public).status();
    let ok = ok.unwrap().success();
    assert!(ok, "openssl pkey -pubout");
    (std::fs::read(&private).unwrap(), public)
}

fn ed_jwk(kp: &rcgen::KeyPair, kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA", "x": b64url(kp.public_key_raw())})
}

fn ec_signer(kp: &rcgen::KeyPair) -> EncodingKey {
    EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap()
}

/// Provider `mock`, model `m` (priced), key `a` of team `keys`, then `issuers` and `extra`.
fn config(mock: &MockProvider, key: &TestKey, issuers: &str, extra: &str) -> String {
    format!(
        "[[provider]]\nname = \"mock\"\nkind = \"anthropic\"\nbase_url = \"{url}\"\ncredential = \"env:TG_TEST_PROVIDER_KEY\"\n\
         first_byte_timeout = \"2s\"\nhealth = {{ probe = \"none\", failures = 1000 }}\n\
         [[model]]\nname = \"m\"\nmax_attempts = 1\ndeployments = [{{ provider = \"mock\", model = \"{MODEL_ID}\" }}]\n\
         [[key]]\nid = \"a\"\nhash = \"{hash}\"\nteam = \"keys\"\n\n{issuers}\n{extra}\n",
        url = mock.url(),
        hash = key.hash,
    )
}

fn body() -> String {
    json!({
        "model": "m",
        "max_tokens": MAX_TOKENS,
        "stream": true,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string()
}

/// What the gateway reserves for [`body`].
fn worst_case() -> u64 {
    (body().len() as u64 + OVERHEAD) * PROMPT_RATE + MAX_TOKENS * OUTPUT_RATE
}

/// Usage that costs exactly the worst case.
fn usage_at_worst_case() -> String {
    json!({
        "input_tokens": 0,
        "output_tokens": MAX_TOKENS,
        "cache_read_input_tokens": 0,
        "cache_creation_5m_input_tokens": 0,
        "cache_creation_1h_input_tokens": body().len() as u64 + OVERHEAD,
    })
    .to_string()
}

struct Reply {
    status: u16,
    request_id: String,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The error message of an error answer.
    fn message(&self) -> String {
        self.json()["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| self.text.clone())
    }
}

async fn send_full(gw: &Gateway, credential: &str, bearer: bool, headers: &[(&str, &str)]) -> Reply {
    let mut req = client().post(gw.url("/v1/messages")).body(body());
    req = if bearer {
        req.header("authorization", format!("Bearer {credential}"))
    } else {
        req.header("x-api-key", credential)
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let request_id =
        resp.headers().get("x-tollgate-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let text = resp.text().await.unwrap_or_default();
    Reply { status, request_id, text }
}

async fn send(gw: &Gateway, credential: &str) -> Reply {
    send_full(gw, credential, false, &[]).await
}

/// Sends `token` and expects a whole answer; returns the usage record.
async fn accepted(gw: &Gateway, token: &str) -> Value {
    let r = send(gw, token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("event: message_stop"), "{}", r.text);
    gw.record(&r.request_id)
}

fn assert_jwt_record(record: &Value, issuer: &str, kid: Option<&str>, user: &str, team: &str) {
    assert_eq!(record["auth"], "jwt", "{record}");
    assert_eq!(record["key_id"], format!("{issuer}:{user}"), "{record}");
    assert_eq!(record["user"], user, "{record}");
    assert_eq!(record["team"], team, "{record}");
    assert_eq!(record["jwt_issuer"], issuer, "{record}");
    match kid {
        Some(kid) => assert_eq!(record["jwt_kid"], kid, "{record}"),
        None => assert!(record.get("jwt_kid").is_none(), "the kid is omitted when absent: {record}"),
    }
    assert_eq!(record["status"], 200, "{record}");
    assert_eq!(record["outcome"], "complete", "{record}");
}

async fn metrics(gw: &Gateway) -> String {
    client().get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
}

/// `tollgate_jwt_failures_total` by reason.
fn failures(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("tollgate_jwt_failures_total{{reason=\"{reason}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(|v| v.trim().parse().unwrap()).unwrap_or(0)
}

const REASONS: [&str; 10] = [
    "expired",
    "not_yet_valid",
    "signature",
    "unknown_kid",
    "audience",
    "issuer",
    "missing_claim",
    "algorithm",
    "lifetime",
    "malformed",
];

/// Sends `token`, which must be refused with a 401 counted under one of `reasons` (exactly
/// one counter moves) and a message containing `message`; returns the reason counted.
async fn refused(gw: &Gateway, token: &str, reasons: &[&str], message: &str) -> &'static str {
    let before = metrics(gw).await;
    let r = send(gw, token).await;
    assert_eq!(r.status, 401, "{message}: {}", r.text);
    let v = r.json();
    assert_eq!(v["type"], "error", "{}", r.text);
    assert_eq!(v["error"]["type"], "authentication_error", "{}", r.text);
    let text = r.message();
    assert!(text.contains(message), "{text:?} should contain {message:?}");
    // Neither the token nor any of its parts is repeated back.
    assert!(!r.text.contains(token), "the answer repeats the token: {}", r.text);
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(!r.text.contains(part), "the answer repeats part of the token: {}", r.text);
    }
    let after = metrics(gw).await;
    let moved: Vec<&'static str> =
        REASONS.iter().copied().filter(|reason| failures(&after, reason) != failures(&before, reason)).collect();
    assert_eq!(moved.len(), 1, "{message}: counters moved: {moved:?}");
    let reason = moved[0];
    assert!(reasons.contains(&reason), "{message}: counted as {reason}, expected one of {reasons:?}");
    assert_eq!(failures(&after, reason), failures(&before, reason) + 1);
    reason
}

/// Nothing the gateway wrote down (audit log) holds a token.
fn assert_no_token_in_audit(gw: &Gateway, tokens: &[String]) {
    let audit = std::fs::read_to_string(&gw.audit_path).unwrap_or_default();
    for t in tokens {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!audit.contains(t.as_str()), "the audit log holds a token");
        if signature.len() > 8 {
            assert!(!audit.contains(signature), "the audit log holds a token's signature");
        }
    }
}

/// The provider saw its own credential, never the client's token.
fn assert_token_not_forwarded(mock: &MockProvider, tokens: &[&str]) {
    for r in mock.received() {
        assert_eq!(r.headers["x-api-key"], PROVIDER_SECRET);
        assert!(r.headers.get("authorization").is_none(), "the client's bearer token reached the provider");
        let all = format!("{:?}", r.headers);
        for t in tokens {
            assert!(!all.contains(t), "a token reached the provider");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One test per key family.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_secrets_from_env_and_file() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let file_secret = "a-second-secret-read-from-a-file-0123456789";
    let secret_path = dir.path().join("jwt.secret");
    std::fs::write(&secret_path, format!("{file_secret}\n")).unwrap();
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\n\
         secrets = [{{ kid = \"k1\", secret = \"env:{SECRET_ENV}\" }}, {{ kid = \"k2\", secret = \"file:{}\" }}]\n",
        secret_path.display()
    );
    let gw = start_gateway_admin("", &[(SECRET_ENV, SECRET)], &config(&mock, &key, &issuers, ""));

    // The secret from the environment, on x-api-key.
    let t1 = mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), &claims("alice", "x"));
    assert_jwt_record(&accepted(&gw, &t1).await, "helper", Some("k1"), "alice", "x");

    // The secret from the file (its trailing newline is not part of it), as a bearer token.
    let t2 = mint(Algorithm::HS256, Some("k2"), &hmac(file_secret), &claims("bob", "y"));
    let r = send_full(&gw, &t2, true, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_jwt_record(&gw.record(&r.request_id), "helper", Some("k2"), "bob", "y");

    // Without a kid, every secret of the family is tried; the record then has no kid.
    let t3 = mint(Algorithm::HS256, None, &hmac(file_secret), &claims("carol", "y"));
    assert_jwt_record(&accepted(&gw, &t3).await, "helper", None, "carol", "y");

    // A kid names one secret: the other secret's signature does not pass under it.
    let crossed = mint(Algorithm::HS256, Some("k1"), &hmac(file_secret), &claims("dave", "y"));
    refused(&gw, &crossed, &["signature"], "JWT signature does not verify").await;

    // The same token again is served from the cache, and still right.
    assert_jwt_record(&accepted(&gw, &t1).await, "helper", Some("k1"), "alice", "x");

    // Keys go on working as keys, and say so.
    let r = messages_request(&gw, &key).body(body()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-tollgate-request-id"].to_str().unwrap().to_string();
    let record = gw.record(&id);
    assert_eq!((&record["auth"], &record["key_id"], &record["team"]), (&json!("key"), &json!("a"), &json!("keys")));
    assert!(record.get("jwt_issuer").is_none() && record.get("jwt_kid").is_none(), "{record}");

    assert_eq!(mock.received().len(), 5);
    assert_token_not_forwarded(&mock, &[&t1, &t2, &t3]);
    assert_no_token_in_audit(&gw, &[t1, t2, t3, crossed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_with_a_pem_public_key() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_key(dir.path(), "idp");
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"idp\"\nissuer = \"https://idp.example\"\naudience = [\"tollgate\"]\n\
         algorithms = [\"RS256\"]\npublic_keys = [{{ kid = \"r1\", file = \"{}\" }}]\n",
        public.display()
    );
    let gw = start_gateway(&config(&mock, &key, &issuers, ""));
    let signer = EncodingKey::from_rsa_pem(&private).unwrap();
    let c = with(claims("alice", "x"), json!({"iss": "https://idp.example", "aud": ["other", "tollgate"]}));
    let token = mint(Algorithm::RS256, Some("r1"), &signer, &c);
    let r = send_full(&gw, &token, true, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_jwt_record(&gw.record(&r.request_id), "idp", Some("r1"), "alice", "x");
    assert_token_not_forwarded(&mock, &[&token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_with_a_pem_public_key() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let public = dir.path().join("ec.pub.pem");
    std::fs::write(&public, kp.public_key_pem()).unwrap();
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"ec\"\nalgorithms = [\"ES256\"]\npublic_keys = [{{ kid = \"e1\", file = \"{}\" }}]\n",
        public.display()
    );
    let gw = start_gateway(&config(&mock, &key, &issuers, ""));
    let token = mint(Algorithm::ES256, Some("e1"), &ec_signer(&kp), &claims("alice", "x"));
    assert_jwt_record(&accepted(&gw, &token).await, "ec", Some("e1"), "alice", "x");
    // Another P-256 key's signature does not pass.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = mint(Algorithm::ES256, Some("e1"), &ec_signer(&other), &claims("mallory", "x"));
    refused(&gw, &forged, &["signature"], "JWT signature does not verify").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eddsa_with_a_pem_public_key() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let public = dir.path().join("ed.pub.pem");
    std::fs::write(&public, kp.public_key_pem()).unwrap();
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"ed\"\nalgorithms = [\"EdDSA\"]\npublic_keys = [{{ kid = \"d1\", file = \"{}\" }}]\n",
        public.display()
    );
    let gw = start_gateway(&config(&mock, &key, &issuers, ""));
    let signer = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
    let token = mint(Algorithm::EdDSA, Some("d1"), &signer, &claims("alice", "x"));
    assert_jwt_record(&accepted(&gw, &token).await, "ed", Some("d1"), "alice", "x");
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let forged = mint(
        Algorithm::EdDSA,
        Some("d1"),
        &EncodingKey::from_ed_pem(other.serialize_pem().as_bytes()).unwrap(),
        &claims("mallory", "x"),
    );
    refused(&gw, &forged, &["signature"], "JWT signature does not verify").await;
}

// ---------------------------------------------------------------------------------------------
// JWKS.
// ---------------------------------------------------------------------------------------------

/// A JWKS endpoint on loopback: serves the document it holds (or an error status), counts
/// fetches.
struct JwksServer {
    url: String,
    server: CannedServer,
}

impl JwksServer {
    fn start(doc: Value) -> Self {
        let server = CannedServer::start(200, &[], doc.to_string().into_bytes());
        JwksServer { url: server.url.clone(), server }
    }

    fn serve(&self, doc: Value) {
        self.server.serve(doc.to_string().into_bytes());
    }

    fn fail(&self, status: u16) {
        self.server.set(status, b"{\"error\":\"down\"}".to_vec());
    }

    fn hits(&self) -> usize {
        self.server.hits()
    }
}

/// Sends fresh tokens from `make` until one gets `status`, within `within`.
async fn eventually(gw: &Gateway, within: Duration, status: u16, make: impl Fn() -> String) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let r = send(gw, &make()).await;
        if r.status == status {
            return r;
        }
        assert!(Instant::now() < deadline, "still {} instead of {status}: {}", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_keeps_retired_keys_through_the_grace_period() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let a = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let b = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let c = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let d = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let jwks = JwksServer::start(json!({"keys": [ec_jwk(&a, "A")]}));
    // Two issuers on the same set: `idp` keeps retired keys an hour, `brief` one second.
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"idp\"\nissuer = \"https://idp.example\"\nalgorithms = [\"ES256\", \"EdDSA\"]\n\
         jwks_url = \"{url}\"\njwks_allow_http = true\njwks_refresh = \"1s\"\njwks_grace = \"1h\"\n\
         [[jwt_issuer]]\nname = \"brief\"\nissuer = \"https://brief.example\"\nalgorithms = [\"ES256\"]\n\
         jwks_url = \"{url}\"\njwks_allow_http = true\njwks_refresh = \"1s\"\njwks_grace = \"1s\"\n",
        url = jwks.url
    );
    let gw = start_gateway(&config(&mock, &key, &issuers, ""));
    assert!(jwks.hits() >= 1, "the set is fetched before the gateway listens");
    let token = |kp: &rcgen::KeyPair, kid: &str, iss: &str, user: &str| {
        let c = with(claims(user, "x"), json!({ "iss": format!("https://{iss}.example") }));
        mint(Algorithm::ES256, Some(kid), &ec_signer(kp), &c)
    };

    // Key A verifies from the first request.
    let brief_a = token(&a, "A", "brief", "early");
    assert_jwt_record(&accepted(&gw, &token(&a, "A", "idp", "alice")).await, "idp", Some("A"), "alice", "x");
    assert_jwt_record(&accepted(&gw, &brief_a).await, "brief", Some("A"), "early", "x");
    let unknown_b = token(&b, "B", "idp", "bob");
    refused(&gw, &unknown_b, &["unknown_kid"], "JWT key id \"B\" is unknown to issuer \"idp\"").await;

    // Rotation: the set now holds B (and an Ed25519 key D), not A.
    jwks.serve(json!({"keys": [ec_jwk(&b, "B"), ed_jwk(&d, "D")]}));
    let r = eventually(&gw, Duration::from_secs(10), 200, || token(&b, "B", "idp", "bob")).await;
    assert_jwt_record(&gw.record(&r.request_id), "idp", Some("B"), "bob", "x");
    // A token refused before the rotation is not remembered as refused.
    assert_eq!(send(&gw, &unknown_b).await.status, 200);

    // A new token signed with A still passes: A is within its grace period.
    assert_jwt_record(&accepted(&gw, &token(&a, "A", "idp", "alice")).await, "idp", Some("A"), "alice", "x");
    // The Ed25519 key of the set works too.
    let ed = EncodingKey::from_ed_pem(d.serialize_pem().as_bytes()).unwrap();
    let c_ed = with(claims("dan", "x"), json!({"iss": "https://idp.example"}));
    assert_jwt_record(
        &accepted(&gw, &mint(Algorithm::EdDSA, Some("D"), &ed, &c_ed)).await,
        "idp",
        Some("D"),
        "dan",
        "x",
    );
    // A kid the set never held.
    let unknown = token(&c, "C", "idp", "carol");
    refused(&gw, &unknown, &["unknown_kid"], "JWT key id \"C\" is unknown to issuer \"idp\"").await;
    // A known kid with another key's signature.
    refused(&gw, &token(&c, "B", "idp", "carol"), &["signature"], "JWT signature does not verify").await;

    // For `brief`, A's grace runs out: new tokens signed with A are refused...
    let r = eventually(&gw, Duration::from_secs(10), 401, || token(&a, "A", "brief", "late")).await;
    assert!(r.message().contains("JWT key id \"A\" is unknown to issuer \"brief\""), "{}", r.text);
    // ...while B works for it as well.
    assert_eq!(send(&gw, &token(&b, "B", "brief", "late")).await.status, 200);
    // A token verified before stays cached until it expires.
    assert_eq!(send(&gw, &brief_a).await.status, 200, "verified tokens are cached until exp");

    // The JWKS endpoint fails: the keys held are kept.
    jwks.fail(500);
    let hits = jwks.hits();
    let deadline = Instant::now() + Duration::from_secs(10);
    while jwks.hits() < hits + 2 {
        assert!(Instant::now() < deadline, "the gateway stopped fetching the set");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_jwt_record(&accepted(&gw, &token(&b, "B", "idp", "erin")).await, "idp", Some("B"), "erin", "x");
    assert_jwt_record(&accepted(&gw, &token(&a, "A", "idp", "erin")).await, "idp", Some("A"), "erin", "x");

    let m = metrics(&gw).await;
    assert!(failures(&m, "unknown_kid") >= 3, "{m}");
}

// ---------------------------------------------------------------------------------------------
// Refusals.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_a_401_with_its_reason_counted() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"helper\"\nissuer = \"https://helper.example\"\naudience = [\"tollgate\"]\n\
         algorithms = [\"HS256\"]\nsecrets = [{{ kid = \"k1\", secret = \"env:{SECRET_ENV}\" }}]\n\
         max_lifetime = \"1h\"\nrequired_claims = [\"team\"]\n"
    );
    let gw = start_gateway_admin("", &[(SECRET_ENV, SECRET)], &config(&mock, &key, &issuers, ""));
    let t = now();
    let good = || with(claims("alice", "x"), json!({"iss": "https://helper.example", "aud": "tollgate"}));
    let sign = |c: &Value| mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), c);

    // The policy admits a proper token (so each refusal below is for its one flaw).
    assert_jwt_record(&accepted(&gw, &sign(&good())).await, "helper", Some("k1"), "alice", "x");
    // Within the leeway (60 s) a just-expired token still passes.
    assert_eq!(send(&gw, &sign(&with(good(), json!({"iat": t - 600, "exp": t - 20})))).await.status, 200);

    let mut tokens = Vec::new();
    let cases: Vec<(String, &[&str], &str)> = vec![
        (sign(&with(good(), json!({"iat": t - 3700, "exp": t - 3600}))), &["expired"], "JWT has expired"),
        (sign(&with(good(), json!({"nbf": t + 3600}))), &["not_yet_valid"], "JWT is not valid yet (nbf)"),
        (
            sign(&with(good(), json!({"iat": t + 1800, "exp": t + 2400}))),
            &["not_yet_valid"],
            "issued in the future (iat)",
        ),
        (
            mint(Algorithm::HS256, Some("k1"), &hmac(OTHER_SECRET), &good()),
            &["signature"],
            "JWT signature does not verify",
        ),
        (
            mint(Algorithm::HS256, Some("k9"), &hmac(SECRET), &good()),
            &["unknown_kid"],
            "JWT key id \"k9\" is unknown to issuer \"helper\"",
        ),
        (sign(&with(good(), json!({"aud": "someone-else"}))), &["audience"], "JWT audience is not accepted"),
        (sign(&with(good(), json!({"aud": ["a", "b"]}))), &["audience"], "JWT audience is not accepted"),
        (sign(&with(good(), json!({"aud": null}))), &["missing_claim", "audience"], "aud"),
        (sign(&with(good(), json!({"team": null}))), &["missing_claim"], "JWT lacks the \"team\" claim"),
        (sign(&with(good(), json!({"user": null}))), &["missing_claim"], "JWT lacks the \"user\" claim"),
        (sign(&with(good(), json!({"user": 42}))), &["missing_claim"], "JWT lacks the \"user\" claim"),
        (sign(&with(good(), json!({"user": ""}))), &["missing_claim"], "JWT lacks the \"user\" claim"),
        (sign(&with(good(), json!({"iat": t, "exp": t + 7200}))), &["lifetime"], "JWT lives longer than"),
        // max_lifetime makes iat required.
        (sign(&with(good(), json!({"iat": null}))), &["missing_claim", "malformed"], "iat"),
        (sign(&with(good(), json!({"exp": null}))), &["missing_claim"], "JWT lacks the \"exp\" claim"),
        (sign(&with(good(), json!({"iss": "https://evil.example"}))), &["issuer"], "JWT issuer is not accepted"),
        (sign(&with(good(), json!({"iss": null}))), &["missing_claim", "issuer"], "iss"),
        (unsigned_token(&good()), &["malformed"], "the credential is not a JWT with an accepted algorithm"),
        (
            mint(Algorithm::HS512, Some("k1"), &hmac(SECRET), &good()),
            &["algorithm"],
            "JWT algorithm HS512 is not accepted from issuer \"helper\"",
        ),
    ];
    for (token, reasons, message) in &cases {
        refused(&gw, token, reasons, message).await;
        tokens.push(token.clone());
    }
    // `alg: none` in any spelling, with or without a signature.
    let header = b64url(br#"{"alg":"None","typ":"JWT"}"#);
    let none_signed = format!("{header}.{}.{}", b64url(good().to_string().as_bytes()), b64url(b"anything"));
    refused(&gw, &none_signed, &["malformed"], "the credential is not a JWT with an accepted algorithm").await;
    tokens.push(none_signed);

    // Each refusal is counted once under its reason.
    let m = metrics(&gw).await;
    let expected = [
        ("expired", 1),
        ("not_yet_valid", 2),
        ("signature", 1),
        ("unknown_kid", 1),
        ("audience", 2),
        ("lifetime", 1),
        ("algorithm", 1),
    ];
    for (reason, n) in expected {
        assert_eq!(failures(&m, reason), n, "{reason}: {m}");
    }
    let total: u64 = REASONS.iter().map(|r| failures(&m, r)).sum();
    assert_eq!(total, cases.len() as u64 + 1, "{m}");

    // Refused requests reach no provider and leave no token in the audit log.
    assert_eq!(mock.received().len(), 2);
    assert_no_token_in_audit(&gw, &tokens);
    // A key that is neither configured nor shaped like a JWT gets the key's answer, uncounted.
    let r = send(&gw, "tg-not-a-key").await;
    assert_eq!((r.status, r.message()), (401, "invalid API key".to_string()), "{}", r.text);
    let r = send(&gw, "eyJnot.a-jwt").await;
    assert_eq!(r.status, 401, "{}", r.text);
    let m = metrics(&gw).await;
    let after: u64 = REASONS.iter().map(|r| failures(&m, r)).sum();
    assert_eq!(after, total, "credentials that are not JWTs are not JWT failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_are_never_hmac_secrets_and_iss_picks_the_issuer() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = rsa_key(dir.path(), "idp");
    let (other_private, _) = rsa_key(dir.path(), "other");
    let public_pem = std::fs::read(&public).unwrap();
    // `idp` takes RS256 only; `mixed` takes RS256 and HS256 (with a secret of its own).
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"idp\"\nissuer = \"https://idp.example\"\nalgorithms = [\"RS256\"]\n\
         public_keys = [{{ kid = \"r1\", file = \"{pem}\" }}]\n\
         [[jwt_issuer]]\nname = \"mixed\"\nissuer = \"https://mixed.example\"\nalgorithms = [\"RS256\", \"HS256\"]\n\
         secrets = [{{ kid = \"h1\", secret = \"env:{SECRET_ENV}\" }}]\npublic_keys = [{{ kid = \"r1\", file = \"{pem}\" }}]\n",
        pem = public.display()
    );
    let gw = start_gateway_admin("", &[(SECRET_ENV, SECRET)], &config(&mock, &key, &issuers, ""));
    let iss = |name: &str, user: &str| with(claims(user, "x"), json!({ "iss": format!("https://{name}.example") }));
    let rsa = EncodingKey::from_rsa_pem(&private).unwrap();

    // Each issuer's own tokens pass, and the iss picks which one vouches.
    let ok = mint(Algorithm::RS256, Some("r1"), &rsa, &iss("idp", "alice"));
    assert_jwt_record(&accepted(&gw, &ok).await, "idp", Some("r1"), "alice", "x");
    let ok = mint(Algorithm::RS256, Some("r1"), &rsa, &iss("mixed", "alice"));
    assert_jwt_record(&accepted(&gw, &ok).await, "mixed", Some("r1"), "alice", "x");
    let ok = mint(Algorithm::HS256, Some("h1"), &hmac(SECRET), &iss("mixed", "bob"));
    assert_jwt_record(&accepted(&gw, &ok).await, "mixed", Some("h1"), "bob", "x");

    // The public key PEM used as an HMAC secret: the classic algorithm confusion.
    let confused = mint(Algorithm::HS256, Some("r1"), &EncodingKey::from_secret(&public_pem), &iss("idp", "mallory"));
    refused(&gw, &confused, &["algorithm"], "JWT algorithm HS256 is not accepted from issuer \"idp\"").await;
    // Where HS256 is accepted, the public key is still no HMAC key: by its kid it is unknown...
    let confused = mint(Algorithm::HS256, Some("r1"), &EncodingKey::from_secret(&public_pem), &iss("mixed", "mallory"));
    refused(&gw, &confused, &["unknown_kid"], "JWT key id \"r1\" is unknown to issuer \"mixed\"").await;
    // ...and without a kid only the issuer's secrets are tried.
    let confused = mint(Algorithm::HS256, None, &EncodingKey::from_secret(&public_pem), &iss("mixed", "mallory"));
    refused(&gw, &confused, &["signature"], "JWT signature does not verify").await;

    // Another RSA key's signature.
    let other = EncodingKey::from_rsa_pem(&other_private).unwrap();
    let forged = mint(Algorithm::RS256, Some("r1"), &other, &iss("idp", "mallory"));
    refused(&gw, &forged, &["signature"], "JWT signature does not verify").await;
    // The iss names no issuer, or is missing: with several issuers nothing can check it.
    let stranger = mint(Algorithm::RS256, Some("r1"), &rsa, &iss("stranger", "mallory"));
    refused(&gw, &stranger, &["issuer"], "JWT issuer is not one this gateway trusts").await;
    let anonymous = mint(Algorithm::RS256, Some("r1"), &rsa, &claims("mallory", "x"));
    refused(&gw, &anonymous, &["issuer"], "JWT issuer is not one this gateway trusts").await;
    // An idp token relabelled as from `mixed` is checked by mixed's keys (and the iss it
    // claims); a token from `mixed` that says `idp` is checked by idp's.
    let relabelled = mint(Algorithm::HS256, Some("h1"), &hmac(SECRET), &iss("idp", "mallory"));
    refused(&gw, &relabelled, &["algorithm"], "JWT algorithm HS256 is not accepted from issuer \"idp\"").await;

    let m = metrics(&gw).await;
    for (reason, n) in [("algorithm", 2), ("unknown_kid", 1), ("signature", 2), ("issuer", 2)] {
        assert_eq!(failures(&m, reason), n, "{reason}: {m}");
    }
    assert_eq!(mock.received().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// JWT principals under budgets and limits.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_principals_are_governed_by_their_team_user_and_issuer() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // Team x: 2 a minute for all its members. User erin: 1 a minute. Every principal of the
    // issuer: 3 a minute of its own.
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\n\
         secrets = [{{ kid = \"k1\", secret = \"env:{SECRET_ENV}\" }}]\n\
         models_claim = \"models\"\nlimits = {{ rpm = 3 }}\n"
    );
    let extra = "[[team]]\nid = \"x\"\nlimits = { rpm = 2 }\n[[user]]\nid = \"erin\"\nlimits = { rpm = 1 }\n";
    let gw = start_gateway_admin("", &[(SECRET_ENV, SECRET)], &config(&mock, &key, &issuers, extra));
    let token = |user: &str, team: &str| mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), &claims(user, team));

    // alice of team x: two requests, then the team's limit.
    let alice = token("alice", "x");
    for _ in 0..2 {
        assert_jwt_record(&accepted(&gw, &alice).await, "helper", Some("k1"), "alice", "x");
    }
    let r = send(&gw, &alice).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{}", r.text);
    assert!(r.message().starts_with("rate limit of team \"x\": 2 requests per minute"), "{}", r.text);
    // bob is of team x too: he shares the limit (and a fresh token does not help alice).
    let r = send(&gw, &token("bob", "x")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.message().starts_with("rate limit of team \"x\""), "{}", r.text);
    assert_eq!(send(&gw, &token("alice", "x")).await.status, 429);

    // carol of team y (no team limits): the issuer's 3 a minute per principal.
    let carol = token("carol", "y");
    for _ in 0..3 {
        assert_jwt_record(&accepted(&gw, &carol).await, "helper", Some("k1"), "carol", "y");
    }
    let r = send(&gw, &token("carol", "y")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.message().starts_with("rate limit of key \"helper:carol\": 3 requests per minute"), "{}", r.text);
    // ...which is carol's own: dave of the same team is not affected.
    assert_jwt_record(&accepted(&gw, &token("dave", "y")).await, "helper", Some("k1"), "dave", "y");

    // erin has a user limit of 1.
    assert_jwt_record(&accepted(&gw, &token("erin", "y")).await, "helper", Some("k1"), "erin", "y");
    let r = send(&gw, &token("erin", "y")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.message().starts_with("rate limit of user \"erin\": 1 requests per minute"), "{}", r.text);

    // The models claim restricts the principal.
    let c = with(claims("frank", "y"), json!({"models": ["other"]}));
    let r = send(&gw, &mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), &c)).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.message().contains("may not use model m"), "{}", r.text);
    let c = with(claims("frank", "y"), json!({"models": ["m"]}));
    assert_jwt_record(
        &accepted(&gw, &mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), &c)).await,
        "helper",
        Some("k1"),
        "frank",
        "y",
    );

    assert_eq!(mock.received().len(), 2 + 3 + 1 + 1 + 1);
    let records = gw.records();
    let by = |user: &str| records.iter().filter(|r| r["user"] == user && r["status"] == 200).count();
    assert_eq!((by("alice"), by("bob"), by("carol")), (2, 0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_principals_spend_team_and_issuer_budgets_exactly() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    // Each principal may spend 3 worst cases a day; team x shares 4 between its members.
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\n\
         secrets = [{{ kid = \"k1\", secret = \"env:{SECRET_ENV}\" }}]\n\
         budget = {{ usd = {}, period = \"daily\" }}\n",
        (3 * worst_case()) as f64 / 1e9
    );
    let extra = format!(
        "[[team]]\nid = \"x\"\nbudget = {{ usd = {}, period = \"monthly\" }}\n",
        (4 * worst_case()) as f64 / 1e9
    );
    let gw = start_gateway_admin("", &[(SECRET_ENV, SECRET)], &config(&mock, &key, &issuers, &extra));
    let usage = usage_at_worst_case();
    let worst = [("x-mock-usage", usage.as_str())];
    let token = |user: &str, team: &str| mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), &claims(user, team));
    let alice = token("alice", "x");
    let bob = token("bob", "x");

    // alice spends 3: her own budget is then spent (the team's still has 1).
    for _ in 0..3 {
        let r = send_full(&gw, &alice, false, &worst).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let record = gw.record(&r.request_id);
        assert_jwt_record(&record, "helper", Some("k1"), "alice", "x");
        assert_eq!(record["cost_nanos"], worst_case());
    }
    let r = send_full(&gw, &alice, false, &worst).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.message().contains("daily budget of key \"helper:alice\""), "{}", r.text);
    // bob spends the team's last one; then the team's budget stops him.
    let r = send_full(&gw, &bob, false, &worst).await;
    assert_eq!(r.status, 200);
    gw.record(&r.request_id); // waits until the record is written
    let r = send_full(&gw, &bob, false, &worst).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.message().contains("monthly budget of team \"x\""), "{}", r.text);
    // carol of another team has her own budget.
    assert_eq!(send_full(&gw, &token("carol", "y"), false, &worst).await.status, 200);
    assert_eq!(mock.received().len(), 5);
    let spent: u64 = gw.records().iter().filter(|r| r["team"] == "x").map(|r| r["cost_nanos"].as_u64().unwrap()).sum();
    assert_eq!(spent, 4 * worst_case());
}

// ---------------------------------------------------------------------------------------------
// Config checks.
// ---------------------------------------------------------------------------------------------

fn check_with_issuer(issuer: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/tollgate.toml")).unwrap();
    std::fs::write(&path, format!("{shipped}\n{issuer}")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("check")
        .arg(&path)
        .env_remove("ANTHROPIC_API_KEY")
        .env(SECRET_ENV, SECRET)
        .env("TG_TEST_SHORT_SECRET", "too-short")
        .output()
        .unwrap()
}

#[test]
fn config_check_refuses_alg_none_and_weak_issuers() {
    let ok = check_with_issuer(&format!(
        "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n"
    ));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let refused = [
        (
            format!("[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"none\"]\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n"),
            "algorithm \"none\" is never accepted",
        ),
        (
            format!(
                "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\", \"NONE\"]\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n"
            ),
            "algorithm \"none\" is never accepted",
        ),
        (
            "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\nsecrets = [{ secret = \"env:TG_TEST_SHORT_SECRET\" }]\n"
                .to_string(),
            "at least 32 bytes",
        ),
        (
            format!("[[jwt_issuer]]\nname = \"helper\"\nalgorithms = []\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n"),
            "list the accepted algorithms",
        ),
        ("[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"RS256\"]\n".to_string(), "needs secrets, public_keys or jwks_url"),
        (
            format!("[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"RS256\"]\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n"),
            "no key can check RS256",
        ),
        (
            format!(
                "[[jwt_issuer]]\nname = \"a\"\nalgorithms = [\"HS256\"]\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n\
                 [[jwt_issuer]]\nname = \"b\"\nissuer = \"https://b\"\nalgorithms = [\"HS256\"]\nsecrets = [{{ secret = \"env:{SECRET_ENV}\" }}]\n"
            ),
            "with several issuers, each needs `issuer`",
        ),
    ];
    for (issuer, message) in refused {
        let out = check_with_issuer(&issuer);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{issuer} was accepted");
        assert!(stderr.contains(message), "{stderr:?} should contain {message:?}");
        assert!(!stderr.contains(SECRET), "the secret is printed: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: bugs found while writing these tests, fixed since.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_principal_spend_survives_a_restart() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"helper\"\nalgorithms = [\"HS256\"]\n\
         secrets = [{{ kid = \"k1\", secret = \"env:{SECRET_ENV}\" }}]\n\
         budget = {{ usd = {}, period = \"daily\" }}\n",
        (2 * worst_case()) as f64 / 1e9
    );
    let envs = [(SECRET_ENV, SECRET)];
    let mut gw = start_gateway_admin("", &envs, &config(&mock, &key, &issuers, ""));
    let usage = usage_at_worst_case();
    let worst = [("x-mock-usage", usage.as_str())];
    let alice = mint(Algorithm::HS256, Some("k1"), &hmac(SECRET), &claims("alice", "x"));
    for _ in 0..2 {
        assert_eq!(send_full(&gw, &alice, false, &worst).await.status, 200);
    }
    // Settled first (the record is written after that), or the budget is only held: 429.
    gw.wait_for_records(2);
    assert_eq!(send_full(&gw, &alice, false, &worst).await.status, 403);
    assert!(gw.stop().success());

    let _again = respawn(&gw, &envs);
    let r = send_full(&gw, &alice, false, &worst).await;
    assert_eq!(r.status, 403, "alice's daily budget was spent before the restart: {}", r.text);
    assert!(r.message().contains("daily budget of key \"helper:alice\""), "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_with_an_unsupported_key_still_serves_the_others() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let a = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // An encryption key (RFC 8037 X25519) next to the signing key, as some identity providers
    // publish.
    let x25519 = json!({"kty": "OKP", "crv": "X25519", "kid": "enc", "use": "enc", "x": b64url(&[9u8; 32])});
    let jwks = JwksServer::start(json!({"keys": [x25519, ec_jwk(&a, "A")]}));
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"ES256\"]\njwks_url = \"{}\"\njwks_allow_http = true\njwks_refresh = \"1s\"\n",
        jwks.url
    );
    let gw = start_gateway(&config(&mock, &key, &issuers, ""));
    let token = mint(Algorithm::ES256, Some("A"), &ec_signer(&a), &claims("alice", "x"));
    let r = send(&gw, &token).await;
    assert_eq!(r.status, 200, "key A is in the set: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adding_a_jwks_issuer_fetches_its_keys() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let a = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let jwks = JwksServer::start(json!({"keys": [ec_jwk(&a, "A")]}));
    let gw = start_gateway(&config(&mock, &key, "", ""));
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"ES256\"]\njwks_url = \"{}\"\njwks_allow_http = true\njwks_refresh = \"1s\"\n",
        jwks.url
    );
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, format!("{text}\n{issuers}")).unwrap();
    gw.signal("HUP");
    let token = mint(Algorithm::ES256, Some("A"), &ec_signer(&a), &claims("alice", "x"));
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let r = send(&gw, &token).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new issuer's keys never arrived (fetches: {}): {}",
            jwks.hits(),
            r.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_new_jwks_refresh() {
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let a = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let b = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let jwks = JwksServer::start(json!({"keys": [ec_jwk(&a, "A")]}));
    let issuers = format!(
        "[[jwt_issuer]]\nname = \"idp\"\nalgorithms = [\"ES256\"]\njwks_url = \"{}\"\njwks_allow_http = true\njwks_refresh = \"1h\"\n",
        jwks.url
    );
    let gw = start_gateway(&config(&mock, &key, &issuers, ""));
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(&gw.config_path, text.replace("jwks_refresh = \"1h\"", "jwks_refresh = \"1s\"")).unwrap();
    gw.signal("HUP");
    jwks.serve(json!({"keys": [ec_jwk(&b, "B")]}));
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let token = mint(Algorithm::ES256, Some("B"), &ec_signer(&b), &claims("bob", "x"));
        let r = send(&gw, &token).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the 1 s refresh never applied (fetches: {}): {}", jwks.hits(), r.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
