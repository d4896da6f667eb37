//! Stand-ins for the places clouds issue credentials from, and a ledger of what they issued.
//!
//! A [`Realm`] holds the credentials a cloud has handed out: AWS access keys (long-lived, or
//! temporary with a session token) and Google bearer tokens. The mock provider consults it when
//! [`super::Behavior::realm`] is set, so a request signed with a key the realm never issued, or
//! with one that has expired, is refused the way AWS or Google refuse it.
//!
//! [`CloudStandIn`] is one loopback HTTP server answering as EC2's instance metadata service
//! (IMDSv2), ECS's container credentials endpoint, AWS STS, GCE's metadata server and Google's
//! STS do, each minting fresh credentials into the realm. The paths, methods, headers and answer
//! shapes are those the real clients read (aws-config 1.13, aws-sdk-sts, google-cloud-auth 1.19),
//! so a test can prove the gateway obtains credentials the way the clouds issue them, and obtains
//! new ones before the old expire.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::net::TcpListener;

/// The account every stand-in role lives in.
pub const ACCOUNT_ID: &str = "123456789012";

/// How far `x-amz-date` may be from the clock before AWS calls the signature expired.
const SIGV4_SKEW: Duration = Duration::from_secs(5 * 60);

/// The longest IMDSv2 session EC2 grants (six hours).
const IMDS_MAX_SESSION_TTL: u64 = 21_600;

const STS_XMLNS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Why a request was refused, as the cloud would say it: the HTTP status, the error code
/// (`x-amzn-errortype` for AWS, `status` for Google) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// AWS credentials as an issuer hands them out.
#[derive(Debug, Clone)]
pub struct IssuedAwsKey {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expires: SystemTime,
}

/// What the realm remembers of an AWS key.
struct AwsKey {
    secret: String,
    token: Option<String>,
    expires: Option<SystemTime>,
}

/// The credentials a cloud has issued, shared by the mock provider (which checks them) and the
/// stand-ins (which mint them). Use it as `Arc<Realm>`.
pub struct Realm {
    lifetime: Duration,
    aws_keys: Mutex<HashMap<String, AwsKey>>,
    /// Google access tokens and Bedrock API keys: both travel as `Authorization: Bearer`.
    bearer_tokens: Mutex<HashMap<String, SystemTime>>,
    minted: Mutex<HashMap<String, usize>>,
    rejected: AtomicUsize,
    serial: AtomicU64,
}

impl std::fmt::Debug for Realm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets: only how much the realm holds.
        f.debug_struct("Realm")
            .field("lifetime", &self.lifetime)
            .field("aws_keys", &self.aws_keys.lock().unwrap().len())
            .field("bearer_tokens", &self.bearer_tokens.lock().unwrap().len())
            .field("rejected", &self.rejected())
            .finish()
    }
}

/// The ways a SigV4 request fails authentication. AWS names each differently in its JSON
/// protocols (Bedrock) and its query protocol (STS); [`aws_failure`] picks the name.
#[derive(Debug)]
enum SigV4Problem {
    Missing,
    Incomplete(String),
    UnknownKey,
    Expired,
    BadSignature(String),
}

/// Why a bearer token is refused.
enum BearerProblem {
    Missing,
    Unknown,
    Expired,
}

/// The parts of `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
struct SigV4Authorization {
    access_key_id: String,
    date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: String,
}

impl Realm {
    /// A realm whose stand-ins mint credentials that live `lifetime` (tests use a few seconds to
    /// force refreshes).
    pub fn new(lifetime: Duration) -> Self {
        Realm {
            lifetime,
            aws_keys: Mutex::default(),
            bearer_tokens: Mutex::default(),
            minted: Mutex::default(),
            rejected: AtomicUsize::new(0),
            serial: AtomicU64::new(0),
        }
    }

    /// How long minted credentials live.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Records an AWS key as issued: `token` for temporary keys (then required on every request),
    /// `expires` None for long-lived keys.
    pub fn add_aws_key(&self, id: &str, secret: &str, token: Option<&str>, expires: Option<SystemTime>) {
        let key = AwsKey { secret: secret.to_string(), token: token.map(str::to_string), expires };
        self.aws_keys.lock().unwrap().insert(id.to_string(), key);
    }

    /// Records a Google access token as issued.
    pub fn add_google_token(&self, token: &str, expires: SystemTime) {
        self.bearer_tokens.lock().unwrap().insert(token.to_string(), expires);
    }

    /// Records a Bedrock API key (sent as `Authorization: Bearer`) as issued.
    pub fn add_bedrock_api_key(&self, key: &str, expires: SystemTime) {
        self.add_google_token(key, expires);
    }

    /// Mints a temporary AWS key living [`Realm::lifetime`], counted under `kind`. Its expiry is
    /// whole seconds, as the issuers write it, so the realm and the client agree on it.
    pub fn mint_aws_key(&self, kind: &str) -> IssuedAwsKey {
        let n = self.count_minted(kind);
        let key = IssuedAwsKey {
            access_key_id: format!("ASIAMOCK{n:06}{}", random_string(6, UPPER_ALNUM)),
            secret_access_key: random_string(40, BASE64ISH),
            session_token: format!("IQoJmock//{}", random_string(120, BASE64ISH)),
            expires: whole_seconds(SystemTime::now() + self.lifetime),
        };
        self.add_aws_key(&key.access_key_id, &key.secret_access_key, Some(&key.session_token), Some(key.expires));
        key
    }

    /// Mints a Google access token living [`Realm::lifetime`], counted under `kind`.
    pub fn mint_google_token(&self, kind: &str) -> (String, SystemTime) {
        let n = self.count_minted(kind);
        let token = format!("ya29.mock-{n:06}-{}", random_string(48, URL_SAFE));
        let expires = whole_seconds(SystemTime::now() + self.lifetime);
        self.add_google_token(&token, expires);
        (token, expires)
    }

    /// How many credentials the stand-ins minted of this kind: `imds`, `ecs`,
    /// `sts-web-identity`, `sts-assume-role`, `gce`, `google-sts`.
    pub fn minted(&self, kind: &str) -> usize {
        self.minted.lock().unwrap().get(kind).copied().unwrap_or(0)
    }

    /// How many requests were refused for authentication (by the mock provider or a stand-in).
    pub fn rejected(&self) -> usize {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Counts a refusal and passes it on.
    fn refuse(&self, failure: AuthFailure) -> AuthFailure {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        failure
    }

    /// Counts one more minted credential of `kind` and returns its serial number: a realm-wide
    /// counter, so ids of different kinds never collide either.
    fn count_minted(&self, kind: &str) -> u64 {
        *self.minted.lock().unwrap().entry(kind.to_string()).or_default() += 1;
        self.serial.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Checks a SigV4-signed request as AWS does: a known, unexpired key, its session token, a
    /// fresh `x-amz-date`, and a signature that matches one computed here from the same request.
    /// `service` is the signing name (`bedrock`, `sts`); it also picks the error codes (STS
    /// speaks the query protocol, whose codes differ from the JSON protocols').
    pub fn verify_sigv4(
        &self,
        service: &str,
        method: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), AuthFailure> {
        self.check_sigv4(service, method, path_and_query, headers, body)
            .map_err(|problem| self.refuse(aws_failure(service, problem)))
    }

    /// Checks `Authorization: Bearer T` against the tokens issued, as Google does: an unknown or
    /// expired token is 401 `UNAUTHENTICATED`.
    pub fn verify_bearer(&self, headers: &HeaderMap) -> Result<(), AuthFailure> {
        self.check_bearer(headers).map_err(|_| {
            self.refuse(AuthFailure {
                status: 401,
                code: "UNAUTHENTICATED".into(),
                message: "Request had invalid authentication credentials. Expected OAuth 2 access token, \
                          login cookie or other valid authentication credential. See \
                          https://developers.google.com/identity/sign-in/web/devconsole-project."
                    .into(),
            })
        })
    }

    /// Checks a Bedrock request: a Bedrock API key (`Authorization: Bearer`) the realm issued, or
    /// else a SigV4 signature for the `bedrock` service. Failures carry AWS's codes.
    pub fn verify_bedrock(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), AuthFailure> {
        let bearer = authorization(headers).is_some_and(|a| a.starts_with("Bearer "));
        if !bearer {
            return self.verify_sigv4("bedrock", method, path_and_query, headers, body);
        }
        self.check_bearer(headers).map_err(|problem| {
            let problem = match problem {
                BearerProblem::Missing | BearerProblem::Unknown => SigV4Problem::UnknownKey,
                BearerProblem::Expired => SigV4Problem::Expired,
            };
            self.refuse(aws_failure("bedrock", problem))
        })
    }

    fn check_bearer(&self, headers: &HeaderMap) -> Result<(), BearerProblem> {
        let token = authorization(headers).and_then(|a| a.strip_prefix("Bearer ")).ok_or(BearerProblem::Missing)?;
        let expires = *self.bearer_tokens.lock().unwrap().get(token.trim()).ok_or(BearerProblem::Unknown)?;
        if SystemTime::now() > expires {
            return Err(BearerProblem::Expired);
        }
        Ok(())
    }

    fn check_sigv4(
        &self,
        service: &str,
        method: &str,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), SigV4Problem> {
        let auth = parse_sigv4_authorization(headers)?;
        if auth.service != service {
            return Err(SigV4Problem::BadSignature(format!(
                "Credential should be scoped to correct service: '{service}'."
            )));
        }
        let (secret, token) = self.usable_key(&auth.access_key_id)?;
        check_session_token(token.as_deref(), headers)?;
        let time = signing_time(headers)?;
        let expected = expected_signature(&auth, &secret, token, method, path_and_query, headers, body, time)?;
        if expected != auth.signature {
            return Err(SigV4Problem::BadSignature(
                "The request signature we calculated does not match the signature you provided. Check your \
                 AWS Secret Access Key and signing method. Consult the service documentation for details."
                    .into(),
            ));
        }
        Ok(())
    }

    /// The secret and session token of a key that exists and has not expired.
    fn usable_key(&self, id: &str) -> Result<(String, Option<String>), SigV4Problem> {
        let keys = self.aws_keys.lock().unwrap();
        let key = keys.get(id).ok_or(SigV4Problem::UnknownKey)?;
        if key.expires.is_some_and(|e| SystemTime::now() > e) {
            return Err(SigV4Problem::Expired);
        }
        Ok((key.secret.clone(), key.token.clone()))
    }
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

fn parse_sigv4_authorization(headers: &HeaderMap) -> Result<SigV4Authorization, SigV4Problem> {
    let value = authorization(headers).ok_or(SigV4Problem::Missing)?;
    let incomplete =
        |what: &str| SigV4Problem::Incomplete(format!("Authorization header requires '{what}' parameter."));
    let rest = value
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or_else(|| SigV4Problem::Incomplete("Unsupported Authorization type.".into()))?;
    let mut fields = HashMap::new();
    for part in rest.split(',') {
        if let Some((k, v)) = part.trim().split_once('=') {
            fields.insert(k, v);
        }
    }
    let credential = fields.get("Credential").ok_or_else(|| incomplete("Credential"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [id, date, region, service, "aws4_request"] = scope.as_slice() else {
        return Err(SigV4Problem::Incomplete(format!("Credential is malformed: {credential}")));
    };
    Ok(SigV4Authorization {
        access_key_id: id.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers: fields
            .get("SignedHeaders")
            .ok_or_else(|| incomplete("SignedHeaders"))?
            .split(';')
            .map(str::to_string)
            .collect(),
        signature: fields.get("Signature").ok_or_else(|| incomplete("Signature"))?.to_string(),
    })
}

/// A temporary key must come with its session token, and a long-lived one without any.
fn check_session_token(expected: Option<&str>, headers: &HeaderMap) -> Result<(), SigV4Problem> {
    let sent = headers.get("x-amz-security-token").and_then(|v| v.to_str().ok());
    if sent != expected {
        return Err(SigV4Problem::UnknownKey);
    }
    Ok(())
}

/// `x-amz-date`, which must be within five minutes of now.
fn signing_time(headers: &HeaderMap) -> Result<SystemTime, SigV4Problem> {
    let raw = headers.get("x-amz-date").and_then(|v| v.to_str().ok()).ok_or_else(|| {
        SigV4Problem::Incomplete(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.".into(),
        )
    })?;
    let time = chrono::NaiveDateTime::parse_from_str(raw, "%Y%m%dT%H%M%SZ")
        .map(|t| SystemTime::from(t.and_utc()))
        .map_err(|_| SigV4Problem::Incomplete(format!("Invalid X-Amz-Date: {raw}")))?;
    let now = SystemTime::now();
    let skew = now.duration_since(time).or_else(|_| time.duration_since(now)).unwrap_or_default();
    if skew > SIGV4_SKEW {
        return Err(SigV4Problem::BadSignature(format!(
            "Signature expired: {raw} is now earlier than {} ({} - 5 min.)",
            amz_date(now - SIGV4_SKEW),
            amz_date(now)
        )));
    }
    Ok(time)
}

/// The signature of this request computed here with the key's secret, by the same `aws-sigv4`
/// crate the SDKs use. It signs exactly the headers the client listed in `SignedHeaders` (the
/// signer adds `x-amz-date` and `x-amz-security-token` itself), so a header changed, added to
/// the list or dropped from the request changes the signature.
#[allow(clippy::too_many_arguments)]
fn expected_signature(
    auth: &SigV4Authorization,
    secret: &str,
    token: Option<String>,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    time: SystemTime,
) -> Result<String, SigV4Problem> {
    let mismatch = |why: String| SigV4Problem::BadSignature(why);
    if amz_date(time)[..8] != auth.date {
        return Err(mismatch(format!(
            "Date in Credential scope does not match YYYYMMDD from X-Amz-Date: {}",
            auth.date
        )));
    }
    let host = headers.get(http::header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let url = format!("https://{host}{path_and_query}");
    let mut signed = Vec::new();
    for name in auth.signed_headers.iter().filter(|n| *n != "x-amz-date" && *n != "x-amz-security-token") {
        let before = signed.len();
        for value in headers.get_all(name.as_str()) {
            signed.push((name.as_str(), value.to_str().map_err(|_| mismatch(format!("header {name} is not text")))?));
        }
        if signed.len() == before {
            return Err(mismatch(format!("signed header {name} is not in the request")));
        }
    }
    let identity = Credentials::new(&auth.access_key_id, secret, token, None, "mock-realm").into();
    let mut settings = SigningSettings::default();
    // Sign what the client signed, even headers the SDKs leave out by default.
    settings.excluded_headers = Some(Vec::new());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&auth.region)
        .name(&auth.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| mismatch(e.to_string()))?
        .into();
    let body = SignableBody::Precomputed(sha256_hex(body));
    let request = SignableRequest::new(method, &url, signed.into_iter(), body).map_err(|e| mismatch(e.to_string()))?;
    let (instructions, _) = sign(request, &params).map_err(|e| mismatch(e.to_string()))?.into_parts();
    let ours = instructions
        .headers()
        .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.to_string())
        .unwrap_or_default();
    let ours = ours.rsplit_once("Signature=").map(|(_, s)| s.to_string()).unwrap_or_default();
    Ok(ours)
}

/// AWS's status, code and message for a SigV4 problem, in the service's protocol.
fn aws_failure(service: &str, problem: SigV4Problem) -> AuthFailure {
    let query = service == "sts";
    let pick = |json: &str, query_code: &str| if query { query_code.to_string() } else { json.to_string() };
    let (status, code, message) = match problem {
        SigV4Problem::Missing => (
            403,
            pick("MissingAuthenticationTokenException", "MissingAuthenticationToken"),
            "Missing Authentication Token".into(),
        ),
        SigV4Problem::Incomplete(m) => (400, pick("IncompleteSignatureException", "IncompleteSignature"), m),
        SigV4Problem::UnknownKey => (
            403,
            pick("UnrecognizedClientException", "InvalidClientTokenId"),
            "The security token included in the request is invalid.".into(),
        ),
        SigV4Problem::Expired => (
            403,
            pick("ExpiredTokenException", "ExpiredToken"),
            "The security token included in the request is expired".into(),
        ),
        SigV4Problem::BadSignature(m) => (403, pick("InvalidSignatureException", "SignatureDoesNotMatch"), m),
    };
    AuthFailure { status, code, message }
}

fn sha256_hex(body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(body))
}

/// `YYYYMMDDTHHMMSSZ`, as `x-amz-date` carries it.
fn amz_date(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).format("%Y%m%dT%H%M%SZ").to_string()
}

/// RFC 3339 in UTC with whole seconds, as IMDS, ECS and STS write expirations.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

const UPPER_ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const BASE64ISH: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())] as char).collect()
}

// ---------------------------------------------------------------------------------------------
// The stand-in server.
// ---------------------------------------------------------------------------------------------

/// What the stand-ins expect and report.
#[derive(Debug, Clone)]
pub struct StandInSettings {
    /// The instance profile's role, as IMDS lists it.
    pub imds_role: String,
    /// The region IMDS reports at `/latest/meta-data/placement/region`.
    pub imds_region: String,
    /// The `Authorization` the ECS endpoint insists on (`AWS_CONTAINER_AUTHORIZATION_TOKEN`).
    pub ecs_authorization: Option<String>,
    /// The task role ECS reports.
    pub ecs_role_arn: String,
    /// The only web identity token (a JWT in real life) STS accepts, compared byte for byte.
    pub web_identity_token: String,
    /// The `ExternalId` AssumeRole must carry, if any.
    pub external_id: Option<String>,
    /// The only subject token Google's STS accepts, compared byte for byte.
    pub google_subject_token: String,
    /// The default service account's email on the GCE metadata server.
    pub gce_email: String,
    pub gce_project_id: String,
}

impl Default for StandInSettings {
    fn default() -> Self {
        StandInSettings {
            imds_role: "tollgate-mock-instance-role".into(),
            imds_region: "us-east-1".into(),
            ecs_authorization: None,
            ecs_role_arn: format!("arn:aws:iam::{ACCOUNT_ID}:role/tollgate-mock-task-role"),
            web_identity_token: "mock-web-identity-token".into(),
            external_id: None,
            google_subject_token: "mock-google-subject-token".into(),
            gce_email: "tollgate-mock@mock-project.iam.gserviceaccount.com".into(),
            gce_project_id: "mock-project".into(),
        }
    }
}

/// A request the stand-in received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub method: String,
    pub path: String,
    pub at: SystemTime,
}

/// An STS role assumption the stand-in granted: the action, the role ARN and the external id.
pub type AssumedRole = (String, String, Option<String>);

struct StandInState {
    realm: Arc<Realm>,
    settings: Mutex<StandInSettings>,
    hits: Mutex<Vec<Hit>>,
    /// IMDSv2 session tokens and when they lapse.
    imds_sessions: Mutex<HashMap<String, Instant>>,
    assumed: Mutex<Vec<AssumedRole>>,
    audiences: Mutex<Vec<String>>,
    fail_next: AtomicUsize,
}

impl StandInState {
    fn settings(&self) -> StandInSettings {
        self.settings.lock().unwrap().clone()
    }

    /// True if this credential request should fail (see [`CloudStandIn::fail_next`]).
    fn take_failure(&self) -> bool {
        self.fail_next.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    fn refuse(&self) {
        self.realm.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

/// One loopback HTTP server standing in for the clouds' credential issuers (see the module
/// documentation). It stops when dropped.
pub struct CloudStandIn {
    pub addr: SocketAddr,
    state: Arc<StandInState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl CloudStandIn {
    /// Starts on `127.0.0.1` with a free port, on the current tokio runtime.
    pub async fn start(realm: Arc<Realm>, settings: StandInSettings) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(StandInState {
            realm,
            settings: Mutex::new(settings),
            hits: Mutex::default(),
            imds_sessions: Mutex::default(),
            assumed: Mutex::default(),
            audiences: Mutex::default(),
            fail_next: AtomicUsize::new(0),
        });
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = &mut stop_rx => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(CloudStandIn { addr, state, _stop: stop_tx })
    }

    /// `http://127.0.0.1:PORT`: the IMDS endpoint (`AWS_EC2_METADATA_SERVICE_ENDPOINT`), the STS
    /// endpoint (`AWS_ENDPOINT_URL_STS`) and the GCE metadata root.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The ECS credentials URL (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
    pub fn ecs_url(&self) -> String {
        format!("{}/ecs/credentials", self.url())
    }

    /// Google's STS token URL (`token_url` of an external_account file).
    pub fn google_sts_url(&self) -> String {
        format!("{}/v1/token", self.url())
    }

    /// `127.0.0.1:PORT`, as `GCE_METADATA_HOST` takes it.
    pub fn gce_metadata_host(&self) -> String {
        self.addr.to_string()
    }

    pub fn realm(&self) -> &Arc<Realm> {
        &self.state.realm
    }

    /// How many requests arrived whose path starts with `path_prefix`.
    pub fn hits(&self, path_prefix: &str) -> usize {
        self.state.hits.lock().unwrap().iter().filter(|h| h.path.starts_with(path_prefix)).count()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// The roles STS granted, in order: (`AssumeRole` or `AssumeRoleWithWebIdentity`, role ARN,
    /// external id).
    pub fn assumed_roles(&self) -> Vec<AssumedRole> {
        self.state.assumed.lock().unwrap().clone()
    }

    /// The audiences Google's STS issued tokens for, in order.
    pub fn google_audiences(&self) -> Vec<String> {
        self.state.audiences.lock().unwrap().clone()
    }

    /// Makes the next `n` credential requests (IMDS and ECS credentials, STS, GCE tokens, Google
    /// STS) fail with 503 in the service's error shape, as an issuer having a bad moment does.
    pub fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::Relaxed);
    }

    /// Changes what the stand-ins expect (a rotated web identity token, a new external id).
    pub fn update_settings(&self, change: impl FnOnce(&mut StandInSettings)) {
        change(&mut self.state.settings.lock().unwrap());
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(state: Arc<StandInState>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    state.hits.lock().unwrap().push(Hit {
        method: parts.method.to_string(),
        path: path.clone(),
        at: SystemTime::now(),
    });
    let resp = if path.starts_with("/latest/") {
        imds(&state, &parts)
    } else if path.starts_with("/ecs/") {
        ecs(&state, &parts)
    } else if path == "/" && parts.method == Method::POST {
        aws_sts(&state, &parts, &body)
    } else if path == "/v1/token" {
        google_sts(&state, &parts, &body)
    } else if path == "/" || path.starts_with("/computeMetadata/") {
        gce(&state, &parts)
    } else {
        text(404, "mock cloud: no such endpoint")
    };
    Ok(resp)
}

/// The services answered here, for their error shapes.
#[derive(Clone, Copy)]
enum Issuer {
    Imds,
    Ecs,
    AwsSts,
    Gce,
    GoogleSts,
}

impl Issuer {
    /// An error as the service writes it: plain text from the metadata servers, JSON
    /// `{code, message}` from ECS, the query protocol's `<ErrorResponse>` from STS, and OAuth's
    /// `{error, error_description}` from Google's STS.
    fn error(self, status: u16, code: &str, message: &str) -> Resp {
        match self {
            Issuer::Imds | Issuer::Gce => text(status, message),
            Issuer::Ecs => json(status, serde_json::json!({"code": code, "message": message})),
            Issuer::AwsSts => sts_error(status, code, message),
            Issuer::GoogleSts => json(status, serde_json::json!({"error": code, "error_description": message})),
        }
    }

    fn unavailable(self) -> Resp {
        let code = if matches!(self, Issuer::GoogleSts) { "temporarily_unavailable" } else { "ServiceUnavailable" };
        self.error(503, code, "mock cloud: the issuer is unavailable (fail_next)")
    }
}

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

fn text(status: u16, body: &str) -> Resp {
    respond(status, "text/plain", body.to_string())
}

fn json(status: u16, v: serde_json::Value) -> Resp {
    respond(status, "application/json", serde_json::to_vec_pretty(&v).expect("serializes"))
}

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// A request body's form fields (`application/x-www-form-urlencoded`).
fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

// --- EC2 instance metadata (IMDSv2 only) ------------------------------------------------------

/// IMDSv2: a session from `PUT /latest/api/token`, then GETs carrying it. aws-config reads the
/// role name from the listing verbatim (no trimming), so it is answered without a newline.
fn imds(state: &StandInState, parts: &Parts) -> Resp {
    let path = parts.uri.path();
    if path == "/latest/api/token" {
        return imds_session(state, parts);
    }
    if parts.method != Method::GET {
        return Issuer::Imds.error(405, "", "Method Not Allowed");
    }
    if !imds_session_valid(state, header(parts, "x-aws-ec2-metadata-token")) {
        state.refuse();
        return Issuer::Imds.error(401, "", "Unauthorized");
    }
    let settings = state.settings();
    match path.strip_prefix("/latest/meta-data/") {
        Some("iam/security-credentials/") => text(200, &settings.imds_role),
        Some(p) if p.strip_prefix("iam/security-credentials/") == Some(settings.imds_role.as_str()) => {
            imds_credentials(state)
        }
        Some("placement/region") => text(200, &settings.imds_region),
        _ => Issuer::Imds.error(404, "", "Not Found"),
    }
}

/// `PUT /latest/api/token` with `x-aws-ec2-metadata-token-ttl-seconds` (1 to 21600); the answer
/// echoes the TTL in the same header, which aws-config requires. EC2 refuses the PUT when it
/// carries `X-Forwarded-For` (it came through a proxy).
fn imds_session(state: &StandInState, parts: &Parts) -> Resp {
    if parts.method != Method::PUT {
        return Issuer::Imds.error(405, "", "Method Not Allowed");
    }
    if parts.headers.contains_key("x-forwarded-for") {
        state.refuse();
        return Issuer::Imds.error(403, "", "Forbidden");
    }
    let ttl = header(parts, "x-aws-ec2-metadata-token-ttl-seconds").and_then(|v| v.parse::<u64>().ok());
    let Some(ttl) = ttl.filter(|t| (1..=IMDS_MAX_SESSION_TTL).contains(t)) else {
        return Issuer::Imds.error(400, "", "Bad Request");
    };
    let token = format!("AQAEAmock{}==", random_string(40, BASE64ISH));
    state.imds_sessions.lock().unwrap().insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
    let mut r = text(200, &token);
    r.headers_mut().insert("x-aws-ec2-metadata-token-ttl-seconds", ttl.into());
    r
}

fn imds_session_valid(state: &StandInState, token: Option<&str>) -> bool {
    let sessions = state.imds_sessions.lock().unwrap();
    token.and_then(|t| sessions.get(t)).is_some_and(|lapses| Instant::now() < *lapses)
}

/// The instance profile's credentials, freshly minted, in the JSON EC2 documents.
fn imds_credentials(state: &StandInState) -> Resp {
    if state.take_failure() {
        return Issuer::Imds.unavailable();
    }
    let key = state.realm.mint_aws_key("imds");
    json(
        200,
        serde_json::json!({
            "Code": "Success",
            "LastUpdated": rfc3339(SystemTime::now()),
            "Type": "AWS-HMAC",
            "AccessKeyId": key.access_key_id,
            "SecretAccessKey": key.secret_access_key,
            "Token": key.session_token,
            "Expiration": rfc3339(key.expires),
        }),
    )
}

// --- ECS container credentials -----------------------------------------------------------------

/// `GET /ecs/credentials`, with `Authorization` when the task's token is configured.
fn ecs(state: &StandInState, parts: &Parts) -> Resp {
    if parts.uri.path() != "/ecs/credentials" || parts.method != Method::GET {
        return Issuer::Ecs.error(404, "NotFound", "mock ecs: no such endpoint");
    }
    let settings = state.settings();
    if let Some(expected) = &settings.ecs_authorization {
        if header(parts, "authorization") != Some(expected.as_str()) {
            state.refuse();
            return Issuer::Ecs.error(401, "AccessDenied", "mock ecs: the Authorization header is missing or wrong");
        }
    }
    if state.take_failure() {
        return Issuer::Ecs.unavailable();
    }
    let key = state.realm.mint_aws_key("ecs");
    json(
        200,
        serde_json::json!({
            "RoleArn": settings.ecs_role_arn,
            "AccessKeyId": key.access_key_id,
            "SecretAccessKey": key.secret_access_key,
            "Token": key.session_token,
            "Expiration": rfc3339(key.expires),
        }),
    )
}

// --- AWS STS (the awsQuery protocol: POST / with a form body, XML answers) ---------------------

fn aws_sts(state: &StandInState, parts: &Parts, body: &[u8]) -> Resp {
    let params = form(body);
    let action = params.get("Action").map(String::as_str).unwrap_or_default();
    let version = params.get("Version").map(String::as_str).unwrap_or_default();
    if version != "2011-06-15" || !matches!(action, "AssumeRole" | "AssumeRoleWithWebIdentity") {
        let message = format!("Could not find operation {action} for version {version}");
        return Issuer::AwsSts.error(400, "InvalidAction", &message);
    }
    for required in ["RoleArn", "RoleSessionName"] {
        if params.get(required).is_none_or(|v| v.is_empty()) {
            let message = format!("1 validation error detected: Value null at '{required}' failed to satisfy constraint: Member must not be null");
            return Issuer::AwsSts.error(400, "ValidationError", &message);
        }
    }
    if action == "AssumeRole" {
        assume_role(state, parts, body, &params)
    } else {
        assume_role_with_web_identity(state, &params)
    }
}

/// `AssumeRoleWithWebIdentity` is unsigned: the web identity token is the credential.
fn assume_role_with_web_identity(state: &StandInState, params: &HashMap<String, String>) -> Resp {
    let expected = state.settings().web_identity_token;
    if params.get("WebIdentityToken") != Some(&expected) {
        state.refuse();
        return Issuer::AwsSts.error(400, "InvalidIdentityToken", "Couldn't retrieve verification key from your identity provider, please reference AssumeRoleWithWebIdentity documentation for requirements");
    }
    if state.take_failure() {
        return Issuer::AwsSts.unavailable();
    }
    let role_arn = &params["RoleArn"];
    let key = state.realm.mint_aws_key("sts-web-identity");
    record_assumption(state, "AssumeRoleWithWebIdentity", role_arn, None);
    let extra =
        "<SubjectFromWebIdentityToken>system:serviceaccount:default:tollgate</SubjectFromWebIdentityToken>\n    \
                 <Audience>sts.amazonaws.com</Audience>\n    \
                 <Provider>arn:aws:iam::123456789012:oidc-provider/mock.oidc.local</Provider>\n    ";
    sts_credentials("AssumeRoleWithWebIdentity", &key, role_arn, &params["RoleSessionName"], extra)
}

/// `AssumeRole` must be signed (service `sts`) by a key the realm issued, and carry the external
/// id when one is expected.
fn assume_role(state: &StandInState, parts: &Parts, body: &[u8], params: &HashMap<String, String>) -> Resp {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Err(f) = state.realm.verify_sigv4("sts", parts.method.as_str(), path_and_query, &parts.headers, body) {
        return Issuer::AwsSts.error(f.status, &f.code, &f.message);
    }
    let role_arn = &params["RoleArn"];
    let external_id = params.get("ExternalId").cloned();
    if let Some(expected) = state.settings().external_id {
        if external_id.as_ref() != Some(&expected) {
            state.refuse();
            let message = format!("User: arn:aws:sts::{ACCOUNT_ID}:assumed-role/caller is not authorized to perform: sts:AssumeRole on resource: {role_arn}");
            return Issuer::AwsSts.error(403, "AccessDenied", &message);
        }
    }
    if state.take_failure() {
        return Issuer::AwsSts.unavailable();
    }
    let key = state.realm.mint_aws_key("sts-assume-role");
    record_assumption(state, "AssumeRole", role_arn, external_id);
    sts_credentials("AssumeRole", &key, role_arn, &params["RoleSessionName"], "")
}

fn record_assumption(state: &StandInState, action: &str, role_arn: &str, external_id: Option<String>) {
    state.assumed.lock().unwrap().push((action.to_string(), role_arn.to_string(), external_id));
}

/// `<{Action}Response><{Action}Result>` with the credentials and the assumed role user, as
/// aws-sdk-sts parses it (it checks both element names; `Expiration` is RFC 3339).
fn sts_credentials(action: &str, key: &IssuedAwsKey, role_arn: &str, session: &str, extra: &str) -> Resp {
    let role_name = role_arn.rsplit('/').next().unwrap_or(role_arn);
    let xml = format!(
        "<{action}Response xmlns=\"{STS_XMLNS}\">\n  <{action}Result>\n    {extra}<AssumedRoleUser>\n      \
         <AssumedRoleId>AROAMOCK{role_id}:{session}</AssumedRoleId>\n      \
         <Arn>arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role_name}/{session}</Arn>\n    </AssumedRoleUser>\n    \
         <Credentials>\n      <AccessKeyId>{id}</AccessKeyId>\n      <SecretAccessKey>{secret}</SecretAccessKey>\n      \
         <SessionToken>{token}</SessionToken>\n      <Expiration>{expires}</Expiration>\n    </Credentials>\n  \
         </{action}Result>\n  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n\
         </{action}Response>\n",
        role_id = random_string(13, UPPER_ALNUM),
        session = xml_escape(session),
        role_name = xml_escape(role_name),
        id = key.access_key_id,
        secret = xml_escape(&key.secret_access_key),
        token = xml_escape(&key.session_token),
        expires = rfc3339(key.expires),
        request_id = request_id(),
    );
    respond(200, "text/xml", xml)
}

/// The query protocol's error: `<ErrorResponse><Error><Type>…<Code>…<Message>…`.
fn sts_error(status: u16, code: &str, message: &str) -> Resp {
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let xml = format!(
        "<ErrorResponse xmlns=\"{STS_XMLNS}\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{code}</Code>\n    \
         <Message>{message}</Message>\n  </Error>\n  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n",
        code = xml_escape(code),
        message = xml_escape(message),
        request_id = request_id(),
    );
    respond(status, "text/xml", xml)
}

fn request_id() -> String {
    let h = random_string(32, b"0123456789abcdef");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

// --- GCE metadata server -----------------------------------------------------------------------

/// The GCE metadata server: every request must say `Metadata-Flavor: Google` (and not come
/// through a proxy), every answer says it back.
fn gce(state: &StandInState, parts: &Parts) -> Resp {
    let mut r = gce_answer(state, parts);
    r.headers_mut().insert("metadata-flavor", http::HeaderValue::from_static("Google"));
    r
}

fn gce_answer(state: &StandInState, parts: &Parts) -> Resp {
    if header(parts, "metadata-flavor") != Some("Google") || parts.headers.contains_key("x-forwarded-for") {
        state.refuse();
        return Issuer::Gce.error(403, "", "Missing required header: Metadata-Flavor: Google");
    }
    if parts.method != Method::GET {
        return Issuer::Gce.error(405, "", "Method Not Allowed");
    }
    let settings = state.settings();
    let path = parts.uri.path();
    if let Some(rest) = path.strip_prefix("/computeMetadata/v1/instance/service-accounts/") {
        return gce_service_account(state, &settings, rest);
    }
    match path {
        "/" => text(200, "computeMetadata/\n"),
        "/computeMetadata/v1" | "/computeMetadata/v1/" => text(200, "instance/\noslogin/\nproject/\nuniverse/\n"),
        "/computeMetadata/v1/universe/universe-domain" => text(200, "googleapis.com"),
        "/computeMetadata/v1/project/project-id" => text(200, &settings.gce_project_id),
        "/computeMetadata/v1/instance/zone" => text(200, "projects/123456789012/zones/us-central1-a"),
        _ => Issuer::Gce.error(404, "", "Not Found"),
    }
}

/// `service-accounts/` (the listing), `{account}/email` and `{account}/token`, where the account
/// is `default` or its email.
fn gce_service_account(state: &StandInState, settings: &StandInSettings, rest: &str) -> Resp {
    if rest.is_empty() {
        return text(200, &format!("default/\n{}/\n", settings.gce_email));
    }
    let Some((account, leaf)) = rest.split_once('/') else {
        return Issuer::Gce.error(404, "", "Not Found");
    };
    if account != "default" && account != settings.gce_email {
        return Issuer::Gce.error(404, "", "Not Found");
    }
    match leaf {
        "email" => text(200, &settings.gce_email),
        "token" => gce_token(state),
        _ => Issuer::Gce.error(404, "", "Not Found"),
    }
}

/// `{access_token, expires_in, token_type}`, what google-cloud-auth's MDS client decodes.
fn gce_token(state: &StandInState) -> Resp {
    if state.take_failure() {
        return Issuer::Gce.unavailable();
    }
    let (token, expires) = state.realm.mint_google_token("gce");
    let expires_in = expires.duration_since(SystemTime::now()).unwrap_or_default().as_secs().max(1);
    json(200, serde_json::json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}))
}

// --- Google STS (workload identity federation) --------------------------------------------------

/// `POST /v1/token`: RFC 8693 token exchange. google-cloud-auth sends a form (or JSON, for
/// GDCH) with `grant_type`, `requested_token_type`, `subject_token`, `subject_token_type`,
/// `audience` and `scope`.
fn google_sts(state: &StandInState, parts: &Parts, body: &[u8]) -> Resp {
    if parts.method != Method::POST {
        return Issuer::GoogleSts.error(405, "invalid_request", "mock google sts: POST only");
    }
    let json_body = header(parts, "content-type").is_some_and(|c| c.starts_with("application/json"));
    let params: HashMap<String, String> =
        if json_body { serde_json::from_slice(body).unwrap_or_default() } else { form(body) };
    let field = |name: &str| params.get(name).map(String::as_str).unwrap_or_default();
    let invalid =
        |what: &str| Issuer::GoogleSts.error(400, "invalid_request", &format!("Invalid value for \"{what}\"."));
    if field("grant_type") != TOKEN_EXCHANGE_GRANT {
        return invalid("grant_type");
    }
    if field("requested_token_type") != ACCESS_TOKEN_TYPE {
        return invalid("requested_token_type");
    }
    if field("subject_token_type").is_empty() {
        return invalid("subject_token_type");
    }
    if field("audience").is_empty() {
        return invalid("audience");
    }
    if field("subject_token") != state.settings().google_subject_token {
        state.refuse();
        return Issuer::GoogleSts.error(400, "invalid_grant", "The incoming token has an invalid format or signature.");
    }
    if state.take_failure() {
        return Issuer::GoogleSts.unavailable();
    }
    state.audiences.lock().unwrap().push(field("audience").to_string());
    let (token, expires) = state.realm.mint_google_token("google-sts");
    let expires_in = expires.duration_since(SystemTime::now()).unwrap_or_default().as_secs().max(1);
    json(
        200,
        serde_json::json!({
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::providers::{AwsSigner, AwsSource};

    // AWS's published SigV4 test credentials (the ones src/providers/sigv4.rs tests with).
    const ID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const HOST: &str = "bedrock-runtime.us-east-1.amazonaws.com";
    const PATH: &str = "/model/anthropic.claude-sonnet-4-5%3A0/invoke";
    const BODY: &[u8] = br#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":16,"messages":[]}"#;

    fn realm() -> Arc<Realm> {
        Arc::new(Realm::new(Duration::from_secs(60)))
    }

    /// The gateway's own signer with fixed keys.
    fn signer(id: &str, secret: &str, token: Option<&str>, service: &'static str) -> AwsSigner {
        let source = AwsSource::fixed_for_tests(
            "us-east-1",
            Secret::for_tests(id),
            Secret::for_tests(secret),
            token.map(Secret::for_tests),
        );
        let mut s = AwsSigner::new(source);
        s.service = service;
        s
    }

    /// The headers of a request signed by the gateway's own signer: `host` and `content-type`
    /// signed along, plus what the signer adds.
    fn signed_headers(signer: &AwsSigner, host: &str, path: &str, body: &[u8], time: SystemTime) -> HeaderMap {
        let base = [("host", host), ("content-type", "application/json")];
        let added = signer.sign("POST", &format!("https://{host}{path}"), &base, body, time).unwrap();
        let mut h = HeaderMap::new();
        for (n, v) in base.iter().map(|(n, v)| (n.to_string(), v.to_string())).chain(added) {
            h.insert(http::HeaderName::try_from(n).unwrap(), http::HeaderValue::try_from(v).unwrap());
        }
        h
    }

    fn verify(realm: &Realm, h: &HeaderMap, body: &[u8]) -> Result<(), AuthFailure> {
        realm.verify_sigv4("bedrock", "POST", PATH, h, body)
    }

    fn code(r: Result<(), AuthFailure>) -> String {
        r.expect_err("refused").code
    }

    #[test]
    fn sigv4_accepts_what_the_gateway_signs() {
        let realm = realm();
        realm.add_aws_key(ID, SECRET, None, None);
        let h = signed_headers(&signer(ID, SECRET, None, "bedrock"), HOST, PATH, BODY, SystemTime::now());
        assert_eq!(verify(&realm, &h, BODY), Ok(()));
        assert_eq!(realm.rejected(), 0);
    }

    #[test]
    fn sigv4_accepts_a_temporary_key_with_its_token() {
        let realm = realm();
        let key = realm.mint_aws_key("imds");
        let s = signer(&key.access_key_id, &key.secret_access_key, Some(&key.session_token), "bedrock");
        let h = signed_headers(&s, HOST, PATH, BODY, SystemTime::now());
        assert_eq!(verify(&realm, &h, BODY), Ok(()));
        assert_eq!(realm.minted("imds"), 1);
        assert!(key.access_key_id.starts_with("ASIAMOCK000001") && key.access_key_id.len() == 20);
    }

    #[test]
    fn sigv4_refuses_a_changed_body_or_header() {
        let realm = realm();
        realm.add_aws_key(ID, SECRET, None, None);
        let h = signed_headers(&signer(ID, SECRET, None, "bedrock"), HOST, PATH, BODY, SystemTime::now());
        assert_eq!(code(verify(&realm, &h, b"{}")), "InvalidSignatureException");
        let mut changed = h.clone();
        changed.insert("content-type", http::HeaderValue::from_static("text/plain"));
        assert_eq!(code(verify(&realm, &changed, BODY)), "InvalidSignatureException");
        let mut dropped = h.clone();
        dropped.remove("content-type");
        assert_eq!(code(verify(&realm, &dropped, BODY)), "InvalidSignatureException");
        // Another path is another request.
        let other = realm.verify_sigv4("bedrock", "POST", "/model/other/invoke", &h, BODY);
        assert_eq!(code(other), "InvalidSignatureException");
        assert_eq!(realm.rejected(), 4);
    }

    #[test]
    fn sigv4_refuses_a_wrong_secret_or_an_unknown_key() {
        let realm = realm();
        realm.add_aws_key(ID, "not-the-secret", None, None);
        let h = signed_headers(&signer(ID, SECRET, None, "bedrock"), HOST, PATH, BODY, SystemTime::now());
        let failure = verify(&realm, &h, BODY).unwrap_err();
        assert_eq!((failure.status, failure.code.as_str()), (403, "InvalidSignatureException"));
        let h = signed_headers(&signer("AKIDUNKNOWN", SECRET, None, "bedrock"), HOST, PATH, BODY, SystemTime::now());
        assert_eq!(code(verify(&realm, &h, BODY)), "UnrecognizedClientException");
    }

    #[test]
    fn sigv4_refuses_an_expired_key() {
        let realm = realm();
        let past = SystemTime::now() - Duration::from_secs(1);
        realm.add_aws_key("ASIAEXPIRED", SECRET, Some("tok"), Some(past));
        let h =
            signed_headers(&signer("ASIAEXPIRED", SECRET, Some("tok"), "bedrock"), HOST, PATH, BODY, SystemTime::now());
        let failure = verify(&realm, &h, BODY).unwrap_err();
        assert_eq!((failure.status, failure.code.as_str()), (403, "ExpiredTokenException"));
    }

    #[test]
    fn sigv4_requires_the_session_token_of_a_temporary_key() {
        let realm = realm();
        realm.add_aws_key("ASIATEMP", SECRET, Some("the-token"), None);
        let without = signed_headers(&signer("ASIATEMP", SECRET, None, "bedrock"), HOST, PATH, BODY, SystemTime::now());
        assert_eq!(code(verify(&realm, &without, BODY)), "UnrecognizedClientException");
        let wrong =
            signed_headers(&signer("ASIATEMP", SECRET, Some("other"), "bedrock"), HOST, PATH, BODY, SystemTime::now());
        assert_eq!(code(verify(&realm, &wrong, BODY)), "UnrecognizedClientException");
        // And a long-lived key must come without one.
        realm.add_aws_key(ID, SECRET, None, None);
        let extra = signed_headers(&signer(ID, SECRET, Some("tok"), "bedrock"), HOST, PATH, BODY, SystemTime::now());
        assert_eq!(code(verify(&realm, &extra, BODY)), "UnrecognizedClientException");
    }

    #[test]
    fn sigv4_refuses_a_stale_date_and_a_missing_signature() {
        let realm = realm();
        realm.add_aws_key(ID, SECRET, None, None);
        let stale = SystemTime::now() - Duration::from_secs(6 * 60);
        let h = signed_headers(&signer(ID, SECRET, None, "bedrock"), HOST, PATH, BODY, stale);
        let failure = verify(&realm, &h, BODY).unwrap_err();
        assert_eq!(failure.code, "InvalidSignatureException");
        assert!(failure.message.starts_with("Signature expired"), "{failure:?}");
        let mut unsigned = HeaderMap::new();
        unsigned.insert("host", http::HeaderValue::from_static(HOST));
        assert_eq!(code(verify(&realm, &unsigned, BODY)), "MissingAuthenticationTokenException");
    }

    #[test]
    fn sigv4_checks_the_service_and_speaks_sts_codes_for_sts() {
        let realm = realm();
        realm.add_aws_key(ID, SECRET, None, None);
        let h = signed_headers(&signer(ID, SECRET, None, "bedrock"), HOST, "/", b"", SystemTime::now());
        let failure = realm.verify_sigv4("sts", "POST", "/", &h, b"").unwrap_err();
        assert_eq!(failure.code, "SignatureDoesNotMatch");
        let h = signed_headers(&signer(ID, SECRET, None, "sts"), "sts.amazonaws.com", "/", b"x", SystemTime::now());
        assert_eq!(realm.verify_sigv4("sts", "POST", "/", &h, b"x"), Ok(()));
        assert_eq!(code(realm.verify_sigv4("sts", "POST", "/", &h, b"y")), "SignatureDoesNotMatch");
    }

    #[test]
    fn bearer_tokens_must_be_issued_and_fresh() {
        let realm = realm();
        let (token, _) = realm.mint_google_token("gce");
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", http::HeaderValue::try_from(format!("Bearer {t}")).unwrap());
            h
        };
        assert_eq!(realm.verify_bearer(&bearer(&token)), Ok(()));
        let failure = realm.verify_bearer(&bearer("ya29.forged")).unwrap_err();
        assert_eq!((failure.status, failure.code.as_str()), (401, "UNAUTHENTICATED"));
        realm.add_google_token("ya29.old", SystemTime::now() - Duration::from_secs(1));
        assert!(realm.verify_bearer(&bearer("ya29.old")).is_err());
        assert!(realm.verify_bearer(&HeaderMap::new()).is_err());
        // Bedrock API keys travel the same way, refused with AWS's codes.
        realm.add_bedrock_api_key("ABSKmock", SystemTime::now() + Duration::from_secs(60));
        assert_eq!(realm.verify_bedrock("POST", PATH, &bearer("ABSKmock"), BODY), Ok(()));
        assert_eq!(
            code(realm.verify_bedrock("POST", PATH, &bearer("ABSKforged"), BODY)),
            "UnrecognizedClientException"
        );
        assert_eq!(code(realm.verify_bedrock("POST", PATH, &bearer("ya29.old"), BODY)), "ExpiredTokenException");
        assert_eq!(realm.rejected(), 5);
    }

    // --- The mock provider with a realm ---------------------------------------------------------

    #[tokio::test]
    async fn the_mock_provider_authenticates_bedrock_and_vertex_when_given_a_realm() {
        let realm = realm();
        let mock = super::super::MockProvider::start(super::super::Behavior {
            realm: Some(realm.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let host = mock.addr.to_string();
        let bedrock_url = format!("{}{PATH}", mock.url());

        let r = client.post(&bedrock_url).header("content-type", "application/json").body(BODY).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let kind = r.headers()["x-amzn-errortype"].to_str().unwrap().to_string();
        assert!(kind.starts_with("MissingAuthenticationTokenException:"), "{kind}");
        assert!(r.text().await.unwrap().contains("\"message\""));

        let key = realm.mint_aws_key("imds");
        let s = signer(&key.access_key_id, &key.secret_access_key, Some(&key.session_token), "bedrock");
        let h = signed_headers(&s, &host, PATH, BODY, SystemTime::now());
        let r = client.post(&bedrock_url).headers(h).body(BODY).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

        let vertex_url = format!(
            "{}/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5:rawPredict",
            mock.url()
        );
        let vertex_body = r#"{"anthropic_version":"vertex-2023-10-16","max_tokens":16,"messages":[]}"#;
        let r = client.post(&vertex_url).bearer_auth("ya29.forged").body(vertex_body).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
        let (token, _) = realm.mint_google_token("gce");
        let r = client.post(&vertex_url).bearer_auth(&token).body(vertex_body).send().await.unwrap();
        assert_eq!(r.status(), 200);

        // Anthropic's own format is not the realm's business; every request is still recorded.
        let r = client.post(format!("{}/v1/messages", mock.url())).body(vertex_body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(mock.received().len(), 5);
        assert_eq!(realm.rejected(), 2);
    }

    // --- The stand-ins, by hand ------------------------------------------------------------------

    async fn stand_in(settings: StandInSettings) -> (CloudStandIn, reqwest::Client) {
        (CloudStandIn::start(realm(), settings).await.unwrap(), reqwest::Client::new())
    }

    async fn imds_session(s: &CloudStandIn, c: &reqwest::Client) -> String {
        let r = c
            .put(format!("{}/latest/api/token", s.url()))
            .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
        r.text().await.unwrap()
    }

    #[tokio::test]
    async fn imds_answers_imdsv2_only() {
        let (s, c) = stand_in(StandInSettings::default()).await;
        let base = format!("{}/latest/meta-data/iam/security-credentials/", s.url());
        assert_eq!(c.get(&base).send().await.unwrap().status(), 401, "IMDSv1 is off");
        let r = c.put(format!("{}/latest/api/token", s.url())).send().await.unwrap();
        assert_eq!(r.status(), 400, "a session needs a TTL");
        let token = imds_session(&s, &c).await;
        let role = c.get(&base).header("x-aws-ec2-metadata-token", &token).send().await.unwrap();
        assert_eq!(role.text().await.unwrap(), "tollgate-mock-instance-role");
        let r = c.get(format!("{base}tollgate-mock-instance-role")).header("x-aws-ec2-metadata-token", &token);
        let v: serde_json::Value = r.send().await.unwrap().json().await.unwrap();
        assert_eq!((v["Code"].as_str(), v["Type"].as_str()), (Some("Success"), Some("AWS-HMAC")));
        for field in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration", "LastUpdated"] {
            assert!(v[field].is_string(), "{field} in {v}");
        }
        let expires = chrono::DateTime::parse_from_rfc3339(v["Expiration"].as_str().unwrap()).unwrap();
        assert!(expires.timestamp() > chrono::Utc::now().timestamp());
        let wrong = c.get(&base).header("x-aws-ec2-metadata-token", "forged").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let region = c.get(format!("{}/latest/meta-data/placement/region", s.url()));
        assert_eq!(
            region.header("x-aws-ec2-metadata-token", &token).send().await.unwrap().text().await.unwrap(),
            "us-east-1"
        );
        assert_eq!(s.realm().minted("imds"), 1);
        assert_eq!(s.realm().rejected(), 2);
        assert_eq!(s.hits("/latest/"), 7);
    }

    #[tokio::test]
    async fn imds_fails_when_told_to() {
        let (s, c) = stand_in(StandInSettings::default()).await;
        let token = imds_session(&s, &c).await;
        let url = format!("{}/latest/meta-data/iam/security-credentials/tollgate-mock-instance-role", s.url());
        s.fail_next(1);
        assert_eq!(c.get(&url).header("x-aws-ec2-metadata-token", &token).send().await.unwrap().status(), 503);
        assert_eq!(c.get(&url).header("x-aws-ec2-metadata-token", &token).send().await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn ecs_checks_the_authorization_token() {
        let settings = StandInSettings { ecs_authorization: Some("task-secret".into()), ..Default::default() };
        let (s, c) = stand_in(settings).await;
        let r = c.get(s.ecs_url()).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c.get(s.ecs_url()).header("authorization", "task-secret").send().await.unwrap();
        let v: serde_json::Value = r.json().await.unwrap();
        for field in ["RoleArn", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
            assert!(v[field].is_string(), "{field} in {v}");
        }
        assert_eq!(s.realm().minted("ecs"), 1);
    }

    fn xml_field<'a>(xml: &'a str, tag: &str) -> &'a str {
        let open = format!("<{tag}>");
        let start = xml.find(&open).unwrap_or_else(|| panic!("no {tag} in {xml}")) + open.len();
        &xml[start..start + xml[start..].find('<').unwrap()]
    }

    fn sts_form(pairs: &[(&str, &str)]) -> String {
        form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
    }

    #[tokio::test]
    async fn sts_grants_web_identity_for_the_right_token() {
        let (s, c) = stand_in(StandInSettings::default()).await;
        let role = "arn:aws:iam::123456789012:role/web";
        let send = |token: &'static str| {
            let body = sts_form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", role),
                ("RoleSessionName", "s1"),
                ("WebIdentityToken", token),
            ]);
            c.post(format!("{}/", s.url()))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
        };
        let r = send("forged").await.unwrap();
        assert_eq!(r.status(), 400);
        let xml = r.text().await.unwrap();
        assert_eq!(xml_field(&xml, "Code"), "InvalidIdentityToken");
        assert!(xml.starts_with("<ErrorResponse"));
        let r = send("mock-web-identity-token").await.unwrap();
        assert_eq!(r.status(), 200);
        let xml = r.text().await.unwrap();
        assert!(
            xml.starts_with("<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">")
        );
        assert!(xml.contains("<AssumeRoleWithWebIdentityResult>"));
        assert_eq!(xml_field(&xml, "Arn"), "arn:aws:sts::123456789012:assumed-role/web/s1");
        assert!(xml_field(&xml, "AccessKeyId").starts_with("ASIAMOCK"));
        assert!(!xml_field(&xml, "RequestId").is_empty());
        assert_eq!(s.assumed_roles(), vec![("AssumeRoleWithWebIdentity".into(), role.into(), None)]);
        assert_eq!(s.realm().minted("sts-web-identity"), 1);
    }

    #[tokio::test]
    async fn sts_assume_role_must_be_signed_and_carry_the_external_id() {
        let settings = StandInSettings { external_id: Some("ext-1".into()), ..Default::default() };
        let (s, c) = stand_in(settings).await;
        let key = s.realm().mint_aws_key("imds");
        let sts = signer(&key.access_key_id, &key.secret_access_key, Some(&key.session_token), "sts");
        let host = s.addr.to_string();
        let role = "arn:aws:iam::123456789012:role/target";
        let send = |external_id: Option<&str>, signed: bool| {
            let mut pairs =
                vec![("Action", "AssumeRole"), ("Version", "2011-06-15"), ("RoleArn", role), ("RoleSessionName", "s2")];
            pairs.extend(external_id.map(|e| ("ExternalId", e)));
            let body = sts_form(&pairs);
            let headers = if signed {
                signed_headers(&sts, &host, "/", body.as_bytes(), SystemTime::now())
            } else {
                HeaderMap::new()
            };
            c.post(format!("{}/", s.url())).headers(headers).body(body).send()
        };
        let r = send(Some("ext-1"), false).await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(xml_field(&r.text().await.unwrap(), "Code"), "MissingAuthenticationToken");
        let r = send(None, true).await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(xml_field(&r.text().await.unwrap(), "Code"), "AccessDenied");
        let r = send(Some("ext-1"), true).await.unwrap();
        assert_eq!(r.status(), 200);
        let xml = r.text().await.unwrap();
        assert!(xml.starts_with("<AssumeRoleResponse"));
        assert_eq!(s.assumed_roles(), vec![("AssumeRole".into(), role.into(), Some("ext-1".into()))]);
        assert_eq!(s.realm().rejected(), 2);
    }

    #[tokio::test]
    async fn gce_metadata_insists_on_the_flavor_header() {
        let (s, c) = stand_in(StandInSettings::default()).await;
        let token_url = format!("{}/computeMetadata/v1/instance/service-accounts/default/token?scopes=a,b", s.url());
        let r = c.get(&token_url).send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()["metadata-flavor"], "Google");
        let r = c.get(&token_url).header("Metadata-Flavor", "Google").send().await.unwrap();
        assert_eq!(r.headers()["metadata-flavor"], "Google");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["expires_in"].as_u64().unwrap() > 0);
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {}", v["access_token"].as_str().unwrap()).try_into().unwrap());
        assert_eq!(s.realm().verify_bearer(&h), Ok(()));
        let get = |path: &str| c.get(format!("{}{path}", s.url())).header("Metadata-Flavor", "Google").send();
        let universe = get("/computeMetadata/v1/universe/universe-domain").await.unwrap();
        assert_eq!(universe.text().await.unwrap(), "googleapis.com");
        let email = get("/computeMetadata/v1/instance/service-accounts/default/email").await.unwrap();
        assert_eq!(email.text().await.unwrap(), "tollgate-mock@mock-project.iam.gserviceaccount.com");
        assert_eq!(get("/").await.unwrap().status(), 200);
        assert_eq!(s.realm().minted("gce"), 1);
    }

    #[tokio::test]
    async fn google_sts_exchanges_the_right_subject_token() {
        let (s, c) = stand_in(StandInSettings::default()).await;
        let audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q";
        let send = |subject: &'static str| {
            let body = sts_form(&[
                ("grant_type", TOKEN_EXCHANGE_GRANT),
                ("requested_token_type", ACCESS_TOKEN_TYPE),
                ("subject_token", subject),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", audience),
                ("scope", "https://www.googleapis.com/auth/cloud-platform"),
            ]);
            c.post(s.google_sts_url()).header("content-type", "application/x-www-form-urlencoded").body(body).send()
        };
        let r = send("forged").await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "invalid_grant");
        let v: serde_json::Value = send("mock-google-subject-token").await.unwrap().json().await.unwrap();
        assert_eq!(v["issued_token_type"], ACCESS_TOKEN_TYPE);
        assert_eq!(v["token_type"], "Bearer");
        assert!(v["access_token"].is_string() && v["expires_in"].is_u64());
        assert_eq!(s.google_audiences(), vec![audience.to_string()]);
        assert_eq!(s.realm().minted("google-sts"), 1);
    }

    // --- The stand-ins, driven by the clouds' own client libraries --------------------------------

    fn aws_provider_config() -> aws_config::provider_config::ProviderConfig {
        aws_config::provider_config::ProviderConfig::without_region()
            .with_http_client(aws_smithy_http_client::Builder::new().build_http())
            .with_region(Some(aws_types::region::Region::new("us-east-1")))
    }

    /// A key the realm accepts on a Bedrock request, as the gateway would sign with it.
    fn bedrock_accepts(realm: &Realm, c: &aws_credential_types::Credentials) -> bool {
        let s = signer(c.access_key_id(), c.secret_access_key(), c.session_token(), "bedrock");
        let h = signed_headers(&s, HOST, PATH, BODY, SystemTime::now());
        verify(realm, &h, BODY).is_ok()
    }

    fn imds_provider(s: &CloudStandIn) -> aws_config::imds::credentials::ImdsCredentialsProvider {
        let config = aws_provider_config();
        let client = aws_config::imds::Client::builder().endpoint(s.url()).unwrap().configure(&config).build();
        aws_config::imds::credentials::ImdsCredentialsProvider::builder().imds_client(client).configure(&config).build()
    }

    #[tokio::test]
    async fn aws_configs_imds_provider_gets_fresh_keys() {
        use aws_credential_types::provider::ProvideCredentials;
        let (s, _) = stand_in(StandInSettings::default()).await;
        let provider = imds_provider(&s);
        let first = provider.provide_credentials().await.unwrap();
        let second = provider.provide_credentials().await.unwrap();
        assert_ne!(first.access_key_id(), second.access_key_id());
        assert!(first.expiry().unwrap() > SystemTime::now());
        assert!(bedrock_accepts(s.realm(), &first) && bedrock_accepts(s.realm(), &second));
        assert_eq!(s.realm().minted("imds"), 2);
        // One session, reused; the role is listed before each fetch.
        assert_eq!(s.hits("/latest/api/token"), 1);
        assert_eq!(s.hits("/latest/meta-data/iam/security-credentials/"), 4);
    }

    #[tokio::test]
    async fn aws_configs_web_identity_provider_assumes_the_role() {
        use aws_credential_types::provider::ProvideCredentials;
        let (s, _) = stand_in(StandInSettings::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "mock-web-identity-token").unwrap();
        // The STS endpoint comes from the profile's `endpoint_url` (or AWS_ENDPOINT_URL_STS).
        let profile = format!(
            "[default]\nregion = us-east-1\nendpoint_url = {}\nrole_arn = arn:aws:iam::123456789012:role/web\n\
             web_identity_token_file = {}\nrole_session_name = tollgate\n",
            s.url(),
            token_file.display()
        );
        #[allow(deprecated)]
        let files = aws_config::profile::profile_file::ProfileFiles::builder()
            .with_contents(aws_config::profile::profile_file::ProfileFileKind::Config, profile)
            .build();
        let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
            .configure(&aws_provider_config())
            .profile_files(files)
            .profile_name("default")
            .build();
        let creds = provider.provide_credentials().await.unwrap();
        assert!(creds.access_key_id().starts_with("ASIAMOCK"));
        assert!(bedrock_accepts(s.realm(), &creds));
        assert_eq!(
            s.assumed_roles(),
            vec![("AssumeRoleWithWebIdentity".into(), "arn:aws:iam::123456789012:role/web".into(), None)]
        );
    }

    #[tokio::test]
    async fn aws_configs_assume_role_provider_signs_with_the_instance_role() {
        use aws_credential_types::provider::ProvideCredentials;
        let settings = StandInSettings { external_id: Some("ext-9".into()), ..Default::default() };
        let (s, _) = stand_in(settings).await;
        let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_types::region::Region::new("us-east-1"))
            .endpoint_url(s.url())
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .load()
            .await;
        let provider = aws_config::sts::AssumeRoleProvider::builder("arn:aws:iam::123456789012:role/target")
            .external_id("ext-9")
            .session_name("tollgate")
            .configure(&sdk_config)
            .build_from_provider(imds_provider(&s))
            .await;
        let creds = provider.provide_credentials().await.unwrap();
        assert!(bedrock_accepts(s.realm(), &creds));
        assert_eq!(s.realm().minted("imds"), 1);
        assert_eq!(s.realm().minted("sts-assume-role"), 1);
        assert_eq!(s.realm().rejected(), 0);
        assert_eq!(
            s.assumed_roles(),
            vec![("AssumeRole".into(), "arn:aws:iam::123456789012:role/target".into(), Some("ext-9".into()))]
        );
    }

    fn install_rustls_provider() {
        // google-cloud-auth builds its HTTP clients with rustls and no provider of its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    fn bearer_header(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").try_into().unwrap());
        h
    }

    #[tokio::test]
    async fn google_auths_mds_credentials_get_a_token() {
        install_rustls_provider();
        let (s, _) = stand_in(StandInSettings::default()).await;
        let credentials = google_cloud_auth::credentials::mds::Builder::default()
            .with_endpoint(s.url())
            .build_access_token_credentials()
            .unwrap();
        let token = credentials.access_token().await.unwrap().token;
        assert_eq!(s.realm().verify_bearer(&bearer_header(&token)), Ok(()));
        assert_eq!(s.realm().minted("gce"), 1);
    }

    #[tokio::test]
    async fn google_auths_external_account_exchanges_a_file_token() {
        install_rustls_provider();
        let (s, _) = stand_in(StandInSettings::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("subject-token");
        std::fs::write(&token_file, "mock-google-subject-token").unwrap();
        let audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/prov";
        let config = serde_json::json!({
            "type": "external_account",
            "audience": audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": s.google_sts_url(),
            "credential_source": {"file": token_file.to_str().unwrap()},
        });
        let credentials = google_cloud_auth::credentials::external_account::Builder::new(config)
            .build_access_token_credentials()
            .unwrap();
        let token = credentials.access_token().await.unwrap().token;
        assert_eq!(s.realm().verify_bearer(&bearer_header(&token)), Ok(()));
        assert_eq!(s.google_audiences(), vec![audience.to_string()]);
    }
}
