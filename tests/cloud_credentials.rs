//! Provider credentials obtained the way the clouds issue them, and renewed under load without a
//! failed request.
//!
//! The real gateway binary runs in a hermetic environment (no inherited `AWS_*`, `GOOGLE_*`,
//! `GCE_*`, `CLOUDSDK_*` or proxy variables, an empty `HOME`, absent AWS config files) with only
//! the clouds' own override variables pointing at `tollgate::mock::cloud`'s stand-ins: IMDSv2,
//! AWS STS, the GCE metadata server and Google's STS. The mock provider checks every SigV4
//! signature and bearer token against the realm of credentials those stand-ins issued, and refuses
//! unknown or expired ones as AWS and Google do. Where a test must know which key signed what, a
//! [`RecordingProxy`] sits between the gateway and the stand-in and keeps every exchange.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tollgate::mock::cloud::{CloudStandIn, Realm, StandInSettings};

const BEDROCK_ID: &str = "global.anthropic.claude-sonnet-4-5-20250929-v1:0";
const VERTEX_ID: &str = "claude-sonnet-4-5@20250929";
const IMDS_ROLE: &str = "tollgate-mock-instance-role";
const WEB_ROLE: &str = "arn:aws:iam::123456789012:role/eks-tollgate";
const TARGET_ROLE: &str = "arn:aws:iam::123456789012:role/bedrock-invoke";
const EXTERNAL_ID: &str = "tollgate-ext-7f3a";
const AUDIENCE: &str =
    "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/pool/providers/eks";

/// What the mock answers every request with (the usage record must carry it).
fn usage() -> MockUsage {
    MockUsage { input_tokens: 7, output_tokens: 11, ..Default::default() }
}

/// A mock provider that authenticates against `realm`; streams are eight events 25 ms apart, so
/// some are in flight when the credentials roll over.
async fn realm_mock(realm: &Arc<Realm>) -> MockProvider {
    let behavior = Behavior {
        realm: Some(realm.clone()),
        usage: usage(),
        deltas: 4,
        delay: Duration::from_millis(25),
        ..Default::default()
    };
    MockProvider::start(behavior).await.unwrap()
}

fn bedrock_config(mock: &MockProvider, aws: &str, key: &TestKey) -> String {
    format!(
        "[[provider]]\nname = \"bedrock\"\nkind = \"bedrock\"\nregion = \"us-east-1\"\nbase_url = \"{url}\"\n{aws}\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"bedrock\", model = \"{BEDROCK_ID}\" }}]\n\
         [[key]]\nid = \"k\"\nhash = \"{hash}\"\n",
        url = mock.url(),
        hash = key.hash,
    )
}

fn vertex_config(mock: &MockProvider, auth: &str, key: &TestKey) -> String {
    format!(
        "[[provider]]\nname = \"vertex\"\nkind = \"vertex\"\nproject = \"p1\"\nregion = \"us-east5\"\nbase_url = \"{url}\"\n{auth}\n\
         health = {{ probe = \"none\" }}\n\
         [[model]]\nname = \"m\"\ndeployments = [{{ provider = \"vertex\", model = \"{VERTEX_ID}\" }}]\n\
         [[key]]\nid = \"k\"\nhash = \"{hash}\"\n",
        url = mock.url(),
        hash = key.hash,
    )
}

/// A hermetic environment for the gateway: every inherited variable the clouds' clients read is
/// taken out, `HOME` is an empty directory (no `~/.aws`, no gcloud's
/// `application_default_credentials.json`), the AWS config and credentials files are paths that do
/// not exist, and the log is at `info` (it says when AWS credentials are fetched).
struct CloudEnv {
    dir: tempfile::TempDir,
    set: Vec<(String, String)>,
}

impl CloudEnv {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let absent = dir.path().join("absent");
        let set = vec![
            ("HOME".to_string(), home.display().to_string()),
            ("AWS_CONFIG_FILE".to_string(), absent.join("config").display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE".to_string(), absent.join("credentials").display().to_string()),
            ("TOLLGATE_LOG".to_string(), "info".to_string()),
        ];
        CloudEnv { dir, set }
    }

    fn with(mut self, name: &str, value: &str) -> Self {
        self.set.push((name.to_string(), value.to_string()));
        self
    }

    /// A file in the environment's directory, written without a trailing newline (the clients
    /// read token files verbatim).
    fn file(&self, name: &str, contents: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn start(&self, config: &str) -> Gateway {
        let remove = inherited_env(|n| {
            let upper = n.to_ascii_uppercase();
            ["AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_", "GCLOUD_"].iter().any(|p| upper.starts_with(p))
                || upper.contains("PROXY")
        });
        let envs: Vec<(&str, &str)> = self.set.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        start_gateway_env(&envs, &remove, config)
    }
}

async fn stand_in(lifetime: Duration, settings: StandInSettings) -> CloudStandIn {
    CloudStandIn::start(Arc::new(Realm::new(lifetime)), settings).await.unwrap()
}

fn body(stream: bool) -> String {
    json!({"model": "m", "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// One request through the gateway: (status, request id, body).
async fn send(http: &reqwest::Client, gw: &Gateway, key: &TestKey, stream: bool) -> (u16, String, String) {
    let resp = http
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &key.key)
        .header("anthropic-version", "2023-06-01")
        .body(body(stream))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let rid = resp.headers().get("x-tollgate-request-id").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (status, rid, resp.text().await.unwrap_or_else(|e| format!("body cut: {e}")))
}

/// Whether a 200 answer is whole: a JSON message with the mock's usage, or an SSE stream that
/// reached `message_stop`.
fn complete(stream: bool, text: &str) -> bool {
    if stream {
        return text.starts_with("event: message_start") && text.contains("event: message_stop");
    }
    serde_json::from_str::<Value>(text).is_ok_and(|v| v["usage"]["output_tokens"] == 11)
}

/// One request and one non-streamed request, each must be answered in full, and their usage
/// records must carry the mock's tokens.
async fn two_requests_succeed(gw: &Gateway, key: &TestKey) {
    let http = client();
    for stream in [false, true] {
        let (status, rid, text) = send(&http, gw, key, stream).await;
        assert_eq!(status, 200, "stream={stream}: {text}\n{}", gw.log());
        assert!(complete(stream, &text), "stream={stream}: {text}");
        let r = gw.record(&rid);
        assert_eq!(r["status"], 200);
        assert_eq!(r["outcome"], "complete", "{r}");
        assert_eq!(r["stream"], stream);
        assert_eq!((r["usage"]["input_tokens"].as_u64(), r["usage"]["output_tokens"].as_u64()), (Some(7), Some(11)));
    }
}

/// The access key ids that signed the Bedrock requests the mock received, and each request's
/// session token.
fn bedrock_signers(mock: &MockProvider) -> Vec<(String, Option<String>)> {
    mock.received()
        .iter()
        .filter(|r| r.uri.starts_with("/model/"))
        .map(|r| {
            let auth = r.headers["authorization"].to_str().unwrap();
            let id = auth.split("Credential=").nth(1).and_then(|c| c.split('/').next()).unwrap_or_default();
            let token = r.headers.get("x-amz-security-token").map(|t| t.to_str().unwrap().to_string());
            (id.to_string(), token)
        })
        .collect()
}

/// The bearer tokens the Vertex requests the mock received carried.
fn vertex_tokens(mock: &MockProvider) -> Vec<String> {
    mock.received()
        .iter()
        .filter(|r| r.uri.contains("/publishers/anthropic/models/"))
        .map(|r| r.headers["authorization"].to_str().unwrap().trim_start_matches("Bearer ").to_string())
        .collect()
}

/// (access key id, session token) of every set of AWS credentials issued through `proxy`: IMDS's
/// JSON and STS's XML.
fn issued_aws_keys(proxy: &RecordingProxy) -> Vec<(String, String)> {
    proxy
        .exchanges()
        .iter()
        .filter(|e| e.status == 200)
        .filter_map(|e| {
            let text = e.response_text();
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return Some((v["AccessKeyId"].as_str()?.to_string(), v["Token"].as_str()?.to_string()));
            }
            Some((xml_field(&text, "AccessKeyId")?, xml_field(&text, "SessionToken")?))
        })
        .collect()
}

fn xml_field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    Some(xml[start..start + xml[start..].find('<')?].to_string())
}

/// The Google access tokens issued through `proxy` (GCE metadata or Google's STS answers).
fn issued_google_tokens(proxy: &RecordingProxy) -> Vec<String> {
    proxy
        .exchanges()
        .iter()
        .filter(|e| e.status == 200)
        .filter_map(|e| serde_json::from_slice::<Value>(&e.response).ok()?["access_token"].as_str().map(str::to_string))
        .collect()
}

fn access_key_of(e: &ProxyExchange) -> String {
    let auth = e.headers.get("authorization").map(|v| v.to_str().unwrap()).unwrap_or_default();
    auth.split("Credential=").nth(1).and_then(|c| c.split('/').next()).unwrap_or_default().to_string()
}

fn form_of(e: &ProxyExchange) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(&e.body).into_owned().collect()
}

/// What a load run saw.
#[derive(Debug, Default)]
struct LoadReport {
    sent: usize,
    streamed: usize,
    /// Every answer that was not a whole 200, with when it came (seconds into the run).
    failures: Vec<String>,
    request_ids: Vec<String>,
}

/// `clients` clients sending without pause for `duration`, streamed and non-streamed requests in
/// turn, each checked to be a whole 200 answer.
async fn load(gw: &Gateway, key: &TestKey, clients: usize, duration: Duration) -> LoadReport {
    load_until(gw, key, clients, duration, || false).await
}

/// As [`load`], stopping early once `done` says so (it is asked every 100 ms).
async fn load_until(
    gw: &Gateway,
    key: &TestKey,
    clients: usize,
    limit: Duration,
    done: impl Fn() -> bool,
) -> LoadReport {
    let http = client();
    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let counter = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, api_key) = (http.clone(), gw.url("/v1/messages"), key.key.clone());
            let (report, counter, stop) = (report.clone(), counter.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let stream = counter.fetch_add(1, Ordering::Relaxed) % 2 == 0;
                    let sent = http.post(&url).header("x-api-key", &api_key).body(body(stream)).send().await;
                    let at = start.elapsed().as_secs_f64();
                    let (ok, rid, what) = match sent {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let rid = resp
                                .headers()
                                .get("x-tollgate-request-id")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let text = resp.text().await.unwrap_or_else(|e| format!("body cut: {e}"));
                            (status == 200 && complete(stream, &text), rid, format!("{status} {text}"))
                        }
                        Err(e) => (false, String::new(), format!("no answer: {e}")),
                    };
                    let mut r = report.lock().unwrap();
                    r.sent += 1;
                    r.streamed += usize::from(stream);
                    r.request_ids.push(rid);
                    if !ok {
                        r.failures.push(format!("at {at:.2}s stream={stream}: {what}"));
                    }
                }
            })
        })
        .collect();
    while start.elapsed() < limit && !done() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(report).unwrap().into_inner().unwrap()
}

/// Every request of the run has its usage record, complete, with the mock's tokens.
fn assert_records(gw: &Gateway, report: &LoadReport, before: usize) {
    gw.wait_for_records(before + report.sent);
    let ids: BTreeSet<&str> = report.request_ids.iter().map(String::as_str).collect();
    let records: Vec<Value> =
        gw.records().into_iter().filter(|r| ids.contains(r["request_id"].as_str().unwrap_or_default())).collect();
    assert_eq!(records.len(), report.sent);
    for r in &records {
        assert_eq!((r["status"].as_u64(), r["outcome"].as_str()), (Some(200), Some("complete")), "{r}");
        assert_eq!((r["usage"]["input_tokens"].as_u64(), r["usage"]["output_tokens"].as_u64()), (Some(7), Some(11)));
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

// --- Where the credentials come from -----------------------------------------------------------

/// The EC2 instance metadata service, IMDSv2: a session token first, then the instance role's
/// keys, which sign every Bedrock request together with their session token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_signs_with_keys_from_the_instance_metadata_service() {
    let cloud = stand_in(Duration::from_secs(900), StandInSettings::default()).await;
    let imds = RecordingProxy::start(&cloud.url()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url());
    let gw = env.start(&bedrock_config(&mock, "", &key));

    two_requests_succeed(&gw, &key).await;

    // IMDSv2 as EC2 serves it: PUT for a session, then the role listing and the role's keys,
    // every GET carrying the session token.
    let exchanges = imds.exchanges();
    let calls: Vec<(String, String)> = exchanges.iter().map(|e| (e.method.clone(), e.path.clone())).collect();
    assert_eq!(
        calls,
        [
            ("PUT".to_string(), "/latest/api/token".to_string()),
            ("GET".to_string(), "/latest/meta-data/iam/security-credentials/".to_string()),
            ("GET".to_string(), format!("/latest/meta-data/iam/security-credentials/{IMDS_ROLE}")),
        ],
        "one fetch at start, none on the request path"
    );
    let session = exchanges[0].response_text();
    assert!(exchanges[1..].iter().all(|e| e.headers["x-aws-ec2-metadata-token"] == session.as_str()));
    let issued = issued_aws_keys(&imds);
    assert_eq!(issued.len(), 1);
    let (id, token) = issued[0].clone();
    assert!(id.starts_with("ASIAMOCK"), "{id}");
    let signers = bedrock_signers(&mock);
    assert_eq!(signers, vec![(id.clone(), Some(token.clone())); 2], "both requests signed by the IMDS key");
    assert_eq!(realm.minted("imds"), 1);
    assert_eq!(realm.rejected(), 0);
    assert_eq!(count(&gw.log(), "AWS credentials fetched"), 1, "{}", gw.log());
}

/// EKS's IAM roles for service accounts: a web identity token in a file, traded with STS
/// (`AssumeRoleWithWebIdentity`, unsigned) for the role's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_signs_with_a_role_assumed_with_a_web_identity_token() {
    let cloud = stand_in(Duration::from_secs(900), StandInSettings::default()).await;
    let sts = RecordingProxy::start(&cloud.url()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new();
    let token_file = env.file("web-identity-token", "mock-web-identity-token");
    let env = env
        .with("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap())
        .with("AWS_ROLE_ARN", WEB_ROLE)
        .with("AWS_ROLE_SESSION_NAME", "tollgate-pod")
        .with("AWS_ENDPOINT_URL_STS", &sts.url())
        .with("AWS_EC2_METADATA_DISABLED", "true");
    let gw = env.start(&bedrock_config(&mock, "", &key));

    two_requests_succeed(&gw, &key).await;

    assert_eq!(cloud.assumed_roles(), vec![("AssumeRoleWithWebIdentity".to_string(), WEB_ROLE.to_string(), None)]);
    let exchanges = sts.exchanges();
    assert_eq!(exchanges.len(), 1, "{exchanges:?}");
    let form = form_of(&exchanges[0]);
    assert_eq!(form["Action"], "AssumeRoleWithWebIdentity");
    assert_eq!(form["RoleSessionName"], "tollgate-pod");
    assert_eq!(form["WebIdentityToken"], "mock-web-identity-token");
    let issued = issued_aws_keys(&sts);
    assert_eq!(bedrock_signers(&mock), vec![(issued[0].0.clone(), Some(issued[0].1.clone())); 2]);
    assert_eq!(cloud.hits("/latest/"), 0, "IMDS is disabled");
    assert_eq!((realm.minted("sts-web-identity"), realm.minted("imds")), (1, 0));
    assert_eq!(realm.rejected(), 0);
}

/// `aws.role_arn` on top of the chain: the instance role's keys (IMDS) sign STS `AssumeRole`
/// with the external id, and the assumed role's keys, not the instance role's, sign Bedrock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_signs_with_a_role_assumed_on_top_of_the_instance_role() {
    let settings = StandInSettings { external_id: Some(EXTERNAL_ID.into()), ..Default::default() };
    let cloud = stand_in(Duration::from_secs(900), settings).await;
    let imds = RecordingProxy::start(&cloud.url()).await;
    let sts = RecordingProxy::start(&cloud.url()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env =
        CloudEnv::new().with("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.url()).with("AWS_ENDPOINT_URL_STS", &sts.url());
    let aws = format!(
        "aws = {{ role_arn = \"{TARGET_ROLE}\", external_id = \"{EXTERNAL_ID}\", session_name = \"tollgate-bedrock\" }}"
    );
    let gw = env.start(&bedrock_config(&mock, &aws, &key));

    two_requests_succeed(&gw, &key).await;

    assert_eq!(
        cloud.assumed_roles(),
        vec![("AssumeRole".to_string(), TARGET_ROLE.to_string(), Some(EXTERNAL_ID.to_string()))]
    );
    let instance_keys: BTreeSet<String> = issued_aws_keys(&imds).into_iter().map(|(id, _)| id).collect();
    let assumed = issued_aws_keys(&sts);
    assert_eq!(assumed.len(), 1);
    assert!(!instance_keys.is_empty());
    // AssumeRole was signed (service `sts`) by an instance-role key, with the session name set.
    let call = &sts.exchanges()[0];
    assert_eq!(form_of(call)["RoleSessionName"], "tollgate-bedrock");
    assert!(call.headers["authorization"].to_str().unwrap().contains("/us-east-1/sts/aws4_request"));
    assert!(instance_keys.contains(&access_key_of(call)), "AssumeRole signed by {}", access_key_of(call));
    // Bedrock saw only the assumed role's key.
    let signers = bedrock_signers(&mock);
    assert_eq!(signers, vec![(assumed[0].0.clone(), Some(assumed[0].1.clone())); 2]);
    assert!(signers.iter().all(|(id, _)| !instance_keys.contains(id)));
    assert_eq!(realm.minted("sts-assume-role"), 1);
    assert!(realm.minted("imds") >= 1);
    assert_eq!(realm.rejected(), 0);
}

/// GCE, GKE workload identity, Cloud Run: with no credential configured, Application Default
/// Credentials end at the metadata server, whose tokens Vertex accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_uses_tokens_from_the_gce_metadata_server() {
    let cloud = stand_in(Duration::from_secs(900), StandInSettings::default()).await;
    let mds = RecordingProxy::start(&cloud.url()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("GCE_METADATA_HOST", &mds.addr.to_string());
    let gw = env.start(&vertex_config(&mock, "", &key));

    two_requests_succeed(&gw, &key).await;

    let issued = issued_google_tokens(&mds);
    assert_eq!(issued.len(), 1, "{:?}", mds.exchanges());
    assert!(issued[0].starts_with("ya29.mock-"));
    assert_eq!(vertex_tokens(&mock), vec![issued[0].clone(); 2]);
    let token_calls: Vec<ProxyExchange> =
        mds.exchanges().into_iter().filter(|e| e.path.contains("/service-accounts/default/token")).collect();
    assert_eq!(token_calls.len(), 1);
    assert_eq!(token_calls[0].headers["metadata-flavor"], "Google");
    assert!(token_calls[0].path.contains("cloud-platform"), "Vertex's scope: {}", token_calls[0].path);
    assert_eq!(realm.minted("gce"), 1);
    assert_eq!(realm.rejected(), 0);
}

/// Workload identity federation: an `external_account` credentials file whose subject token comes
/// from a file, traded at Google's STS for an access token Vertex accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_uses_workload_identity_federation() {
    let cloud = stand_in(Duration::from_secs(900), StandInSettings::default()).await;
    let sts = RecordingProxy::start(&cloud.url()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new();
    let subject = env.file("subject-token", "mock-google-subject-token");
    let external = json!({
        "type": "external_account",
        "audience": AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": format!("{}/v1/token", sts.url()),
        "credential_source": {"file": subject.to_str().unwrap()},
    });
    let file = env.file("external-account.json", &external.to_string());
    let gw = env.start(&vertex_config(&mock, &format!("google_credentials = \"file:{}\"", file.display()), &key));

    two_requests_succeed(&gw, &key).await;

    assert_eq!(cloud.google_audiences(), vec![AUDIENCE.to_string()]);
    let exchange = &sts.exchanges()[0];
    let form = form_of(exchange);
    assert_eq!(form["grant_type"], "urn:ietf:params:oauth:grant-type:token-exchange");
    assert_eq!(form["subject_token"], "mock-google-subject-token");
    assert_eq!(form["scope"], "https://www.googleapis.com/auth/cloud-platform");
    let issued = issued_google_tokens(&sts);
    assert_eq!(issued.len(), 1);
    assert_eq!(vertex_tokens(&mock), vec![issued[0].clone(); 2]);
    assert_eq!(cloud.hits("/computeMetadata/"), 0, "not the metadata server");
    assert_eq!(realm.minted("google-sts"), 1);
    assert_eq!(realm.rejected(), 0);
}

// --- Renewal under load ------------------------------------------------------------------------

/// IMDS keys living 8 s are renewed half-way through their life while four clients send without
/// pause for 18 s: every request gets a whole 200, signed by a key the realm still honours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_renews_imds_keys_under_load_without_a_failed_request() {
    let cloud = stand_in(Duration::from_secs(8), StandInSettings::default()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("AWS_EC2_METADATA_SERVICE_ENDPOINT", &cloud.url());
    let gw = env.start(&bedrock_config(&mock, "", &key));

    let report = load(&gw, &key, 4, Duration::from_secs(18)).await;
    let minted = realm.minted("imds");
    let signers: BTreeSet<String> = bedrock_signers(&mock).into_iter().map(|(id, _)| id).collect();
    let fetched = count(&gw.log(), "AWS credentials fetched");
    eprintln!(
        "IMDS under load: {} requests ({} streamed), {} failed; {minted} keys minted, {} signed, {fetched} fetches logged",
        report.sent,
        report.streamed,
        report.failures.len(),
        signers.len()
    );
    assert!(report.failures.is_empty(), "{} failed: {:#?}\n{}", report.failures.len(), report.failures, gw.log());
    assert!(report.sent >= 200, "a steady stream: {}", report.sent);
    assert!(minted >= 4, "at least three rollovers: {minted} keys minted");
    assert!(signers.len() >= 4, "requests moved to each new key: {signers:?}");
    assert_eq!(realm.rejected(), 0);
    assert_records(&gw, &report, 0);
}

/// GCE tokens living 13 s: Google's library renews short-lived tokens every 10 s, the gateway
/// asks it every second; four clients send for 33 s (three rollovers) without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_renews_gce_tokens_under_load_without_a_failed_request() {
    let cloud = stand_in(Duration::from_secs(13), StandInSettings::default()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("GCE_METADATA_HOST", &cloud.gce_metadata_host());
    let gw = env.start(&vertex_config(&mock, "", &key));

    let report = load(&gw, &key, 4, Duration::from_secs(33)).await;
    let minted = realm.minted("gce");
    let tokens: BTreeSet<String> = vertex_tokens(&mock).into_iter().collect();
    eprintln!(
        "GCE under load: {} requests ({} streamed), {} failed; {minted} tokens minted, {} used",
        report.sent,
        report.streamed,
        report.failures.len(),
        tokens.len()
    );
    assert!(report.failures.is_empty(), "{} failed: {:#?}\n{}", report.failures.len(), report.failures, gw.log());
    assert!(report.sent >= 200, "a steady stream: {}", report.sent);
    assert!(minted >= 4, "at least three rollovers: {minted} tokens minted");
    assert!(tokens.len() >= 4, "requests moved to each new token: {}", tokens.len());
    assert_eq!(realm.rejected(), 0);
    assert_records(&gw, &report, 0);
}

// --- When the issuer fails ---------------------------------------------------------------------

/// STS fails the renewal (three 503s: every attempt of the SDK's retries): the gateway keeps
/// signing with the keys it holds, which are still valid, tries again 5 s later and gets new
/// ones. Not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_outage_shorter_than_the_keys_life_fails_no_request() {
    let cloud = stand_in(Duration::from_secs(30), StandInSettings::default()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new();
    let token_file = env.file("web-identity-token", "mock-web-identity-token");
    let env = env
        .with("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap())
        .with("AWS_ROLE_ARN", WEB_ROLE)
        .with("AWS_ENDPOINT_URL_STS", &cloud.url())
        .with("AWS_EC2_METADATA_DISABLED", "true");
    let gw = env.start(&bedrock_config(&mock, "", &key));
    assert_eq!(realm.minted("sts-web-identity"), 1, "fetched at start");
    // The renewal is due half-way through the 30 s: it meets the outage.
    cloud.fail_next(3);

    // Load until the renewal after the outage has signed for a second and a half (at most 36 s;
    // the held keys expire 29 to 30 s after start and stop signing 2 s before that; the retry
    // comes about 20 s after start: the outage's three tries with the SDK's backoff, then 5 s).
    let renewed = Mutex::new(None::<Instant>);
    let report = load_until(&gw, &key, 3, Duration::from_secs(36), || {
        let mut at = renewed.lock().unwrap();
        if at.is_none() && realm.minted("sts-web-identity") >= 2 {
            *at = Some(Instant::now());
        }
        at.is_some_and(|t| t.elapsed() > Duration::from_millis(1500))
    })
    .await;
    let log = gw.log();
    let (minted, calls) = (realm.minted("sts-web-identity"), cloud.hits("/"));
    let not_fetched = count(&log, "AWS credentials not fetched");
    eprintln!(
        "STS outage: {} requests ({} streamed), {} failed; {calls} STS calls, {minted} keys minted, {not_fetched} failed fetches",
        report.sent,
        report.streamed,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "{} failed: {:#?}\n{log}", report.failures.len(), report.failures);
    assert_eq!(not_fetched, 1, "the renewal failed once: {log}");
    assert!(log.contains("ServiceUnavailable") || log.contains("503"), "the reason is logged: {log}");
    assert_eq!(minted, 2, "renewed on the retry after the outage: {log}");
    assert_eq!(calls, minted + 3, "three refused calls, then the retry");
    let signers: BTreeSet<String> = bedrock_signers(&mock).into_iter().map(|(id, _)| id).collect();
    assert_eq!(signers.len(), 2, "the held key until the retry, the new one after");
    assert_eq!(realm.rejected(), 0);
    assert_records(&gw, &report, 0);
}

/// Keys that expire while STS refuses every renewal: requests get a 503 from the gateway, which
/// says (to the client) that its credentials for Bedrock are unusable and (in `/readyz` and its
/// log) that the AWS credentials expired and why; nothing unsigned or expired reaches Bedrock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_with_no_way_to_renew_get_a_503_that_says_why() {
    let cloud = stand_in(Duration::from_secs(6), StandInSettings::default()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new();
    let token_file = env.file("web-identity-token", "mock-web-identity-token");
    let env = env
        .with("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap())
        .with("AWS_ROLE_ARN", WEB_ROLE)
        .with("AWS_ENDPOINT_URL_STS", &cloud.url())
        .with("AWS_EC2_METADATA_DISABLED", "true");
    let gw = env.start(&bedrock_config(&mock, "", &key));
    cloud.fail_next(usize::MAX);
    let http = client();
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200, "ready while the keys are valid: {ready}");

    let started = Instant::now();
    let (mut ok, mut refusal) = (0, None);
    while started.elapsed() < Duration::from_secs(15) {
        let (status, rid, text) = send(&http, &gw, &key, false).await;
        match status {
            200 => ok += 1,
            503 => {
                refusal = Some((rid, text));
                break;
            }
            other => panic!("{other} before the 503: {text}\n{}", gw.log()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (rid, text) = refusal.unwrap_or_else(|| panic!("no 503 within 15 s\n{}", gw.log()));
    let (ready_status, ready) = gw.readyz().await;
    // Without the admin token, a probe learns only which provider is not ready.
    let probe: Value = client().get(gw.admin_url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(probe["problems"], json!(["provider bedrock: not ready"]), "{probe}");
    eprintln!(
        "expired after {:.1}s and {ok} good requests: {text}\n/readyz {ready_status}: {ready}",
        started.elapsed().as_secs_f64()
    );
    assert!(ok > 0, "the keys fetched at start signed until they expired");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("api_error")), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("provider bedrock: ") && message.contains("credentials"), "{message}");
    // Why, for the operator: the AWS credentials expired, and STS's answer to the renewal. The
    // SDK retries a failing STS call with backoff, so right at the expiry /readyz may still say
    // that a fetch is under way; STS's refusal shows once that fetch gives up.
    assert_eq!(ready_status, 503, "{ready}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ready = ready;
    loop {
        let problem = ready["problems"][0].as_str().unwrap_or_default().to_string();
        assert!(problem.contains("AWS credentials from the AWS credential chain expired: "), "{ready}");
        if problem.contains("ServiceUnavailable") || problem.contains("unavailable") {
            break;
        }
        assert!(problem.contains("a fetch has been under way"), "and why: {ready}");
        assert!(Instant::now() < deadline, "STS's refusal never shown: {ready}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (status, r) = gw.readyz().await;
        assert_eq!(status, 503);
        ready = r;
    }
    assert!(gw.log().contains("AWS credentials from the AWS credential chain expired"), "{}", gw.log());
    let r = gw.record(&rid);
    assert_eq!((r["status"].as_u64(), r["outcome"].as_str()), (Some(503), Some("failed")), "{r}");
    // The refused request never reached Bedrock: every request the mock saw was a good one.
    assert_eq!(mock.received().len(), ok);
    assert_eq!(realm.rejected(), 0, "no expired key was sent");
}

// --- Rotation through the config ---------------------------------------------------------------

/// Long-lived access keys in `file:` secrets: after the pair is rotated on disk and the gateway
/// reloaded (SIGHUP), the realm sees requests signed by the new key id, and honours them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_access_key_pair_signs_after_sighup() {
    const OLD: (&str, &str) = ("AKIAMOCKOLDKEY000001", "oldSecretKey/K7MDENG+bPxRfiCYEXAMPLEKEY0");
    const NEW: (&str, &str) = ("AKIAMOCKNEWKEY000002", "newSecretKey/K7MDENG+bPxRfiCYEXAMPLEKEY0");
    let realm = Arc::new(Realm::new(Duration::from_secs(900)));
    realm.add_aws_key(OLD.0, OLD.1, None, None);
    realm.add_aws_key(NEW.0, NEW.1, None, None);
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("AWS_EC2_METADATA_DISABLED", "true");
    let id_file = env.file("access-key-id", OLD.0);
    let secret_file = env.file("secret-access-key", OLD.1);
    let aws = format!(
        "aws = {{ access_key_id = \"file:{}\", secret_access_key = \"file:{}\" }}",
        id_file.display(),
        secret_file.display()
    );
    let gw = env.start(&bedrock_config(&mock, &aws, &key));
    two_requests_succeed(&gw, &key).await;
    assert_eq!(bedrock_signers(&mock), vec![(OLD.0.to_string(), None); 2]);

    env.file("access-key-id", NEW.0);
    env.file("secret-access-key", NEW.1);
    gw.signal("HUP");
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        mock.clear();
        let (status, _, text) = send(&http, &gw, &key, false).await;
        assert_eq!(status, 200, "{text}");
        if bedrock_signers(&mock)[0].0 == NEW.0 {
            break;
        }
        assert!(Instant::now() < deadline, "still signed by {:?}", bedrock_signers(&mock));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mock.clear();
    two_requests_succeed(&gw, &key).await;
    assert_eq!(bedrock_signers(&mock), vec![(NEW.0.to_string(), None); 2]);
    assert_eq!(realm.rejected(), 0, "never a key the realm refused (no half-rotated pair)");
}

// --- Known gateway bugs (ignored until fixed; run with `--ignored`) --------------------------------

/// Sends non-streamed requests every 100 ms until one is not a 200 (or `limit` passes): the
/// number of 200s, and the first other answer.
async fn until_refused(gw: &Gateway, key: &TestKey, limit: Duration) -> (usize, Option<(u16, String)>) {
    let (http, started) = (client(), Instant::now());
    let mut ok = 0;
    while started.elapsed() < limit {
        let (status, _, text) = send(&http, gw, key, false).await;
        if status != 200 {
            return (ok, Some((status, text)));
        }
        ok += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (ok, None)
}

/// When the metadata server stays down past the token's expiry, Google's library stops handing
/// out the expired token and reports an error; the gateway must then answer 503 itself, not keep
/// sending the expired token (Google's 401 `UNAUTHENTICATED` reaches the client as a 401
/// `authentication_error`, as if the client's own key were wrong). The library reports an error
/// only once it holds no valid token, so the gateway drops the token it holds on that error, and
/// stops using it as soon as a call to the library waits (the token expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vertex_with_an_expired_token_and_the_metadata_server_down_gets_a_503() {
    let cloud = stand_in(Duration::from_secs(13), StandInSettings::default()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("GCE_METADATA_HOST", &cloud.gce_metadata_host());
    let gw = env.start(&vertex_config(&mock, "", &key));
    cloud.fail_next(usize::MAX);
    let (ok, refusal) = until_refused(&gw, &key, Duration::from_secs(20)).await;
    let (status, text) = refusal.unwrap_or_else(|| panic!("still 200 after 20 s\n{}", gw.log()));
    assert!(ok > 0);
    // The library does not say when its token expires: it is asked four times a second, and a
    // call that waits past 200 ms shows the token expired. A request in that short window may
    // still carry the expired token (a 401 from Vertex); from then on the gateway answers 503.
    let first = Instant::now();
    let mut last = (status, text);
    while last.0 == 401 {
        assert!(first.elapsed() < Duration::from_millis(600), "still 401 after {:?}: {}", first.elapsed(), last.1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (s, _, t) = send(&client(), &gw, &key, false).await;
        last = (s, t);
    }
    assert_eq!(last.0, 503, "{}", last.1);
    for _ in 0..5 {
        let (s, _, t) = send(&client(), &gw, &key, false).await;
        assert_eq!(s, 503, "{t}");
    }
    assert!(realm.rejected() <= 6, "expired tokens sent to Vertex: {}", realm.rejected());
}

/// When IMDS fails, aws-config's IMDS provider hands back the last keys it got (static
/// stability), even once they expired, with a later expiry. The gateway must not take that for
/// a renewal: the held keys' own expiry stands, and once it passes, `/readyz` says that the
/// renewals failed (or are under way), not "no fetch has finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_with_imds_down_past_expiry_says_the_renewal_failed() {
    let cloud = stand_in(Duration::from_secs(6), StandInSettings::default()).await;
    let realm = cloud.realm().clone();
    let mock = realm_mock(&realm).await;
    let key = new_key();
    let env = CloudEnv::new().with("AWS_EC2_METADATA_SERVICE_ENDPOINT", &cloud.url());
    let gw = env.start(&bedrock_config(&mock, "", &key));
    cloud.fail_next(usize::MAX);
    let (_, refusal) = until_refused(&gw, &key, Duration::from_secs(15)).await;
    let (status, text) = refusal.unwrap_or_else(|| panic!("still 200 after 15 s\n{}", gw.log()));
    assert_eq!(status, 503, "{text}");
    let ready = gw.readyz().await.1.to_string();
    assert!(ready.contains("AWS credentials from the AWS credential chain expired"), "{ready}");
    assert!(!ready.contains("no fetch has finished"), "the failed renewals are not mentioned: {ready}\n{}", gw.log());
    assert_eq!(count(&gw.log(), "AWS credentials fetched"), 1, "only the first fetch got keys:\n{}", gw.log());
    assert_eq!(realm.rejected(), 0);
}
