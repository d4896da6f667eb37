//! TLS on the listeners: a renewed certificate is served after a reload without a restart (and
//! an unreadable one is refused, the old one kept), and the admin listener can require client
//! certificates, which the CLI can present.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A fresh connection (no pooling) to `https://localhost:port/`, trusting `ca` only.
async fn probe(port: u16, ca: &str) -> Result<u16, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .resolve("localhost", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    let resp = client.get(format!("https://localhost:{port}/")).send().await.map_err(|e| format!("{e:?}"))?;
    Ok(resp.status().as_u16())
}

const ADMIN_TOKEN: &str = "tls-test-admin-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_after_a_reload() {
    let (old_ca, new_ca) = (Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = old_ca.leaf(&["localhost"]);
    let cert_path = write(dir.path(), "cert.pem", &cert);
    let key_path = write(dir.path(), "key.pem", &key);
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let test_key = new_key();
    let listener = format!("tls = {{ cert = \"{}\", key = \"{}\" }}", cert_path.display(), key_path.display());
    let gw = launch_with(&listener, &one_provider_config(&mock.url(), &test_key));
    assert_eq!(probe(gw.port, &old_ca.pem).await, Ok(200));
    assert!(probe(gw.port, &new_ca.pem).await.is_err());

    // Renewed on disk (by certbot, say): served after SIGHUP, to new connections.
    let (cert, key) = new_ca.leaf(&["localhost"]);
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe(gw.port, &new_ca.pem).await != Ok(200) {
        assert!(Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(probe(gw.port, &old_ca.pem).await.is_err(), "the old certificate is no longer served");

    // A key that does not match the certificate: the reload is refused and says why; the
    // certificate in use stays.
    let (_, other_key) = new_ca.leaf(&["localhost"]);
    std::fs::write(&key_path, other_key).unwrap();
    let resp = client().post(gw.admin_url("/admin/reload")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert!(status >= 400, "{status} {text}");
    assert!(text.contains("do not belong together"), "{text}");
    assert_eq!(probe(gw.port, &new_ca.pem).await, Ok(200));
}

fn launch_with(listener_extra: &str, config: &str) -> Gateway {
    let admin = "token = \"env:TG_ADMIN\"";
    start_gateway_sections("", listener_extra, admin, &[("TG_ADMIN", ADMIN_TOKEN)], config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_can_require_client_certificates() {
    let (server_ca, client_ca, stranger_ca) = (Ca::new(), Ca::new(), Ca::new());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server_ca.leaf(&["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = client_ca.leaf(&["ops"]);
    let (stranger_cert, stranger_key) = stranger_ca.leaf(&["ops"]);
    let server_ca_path = write(dir.path(), "server-ca.pem", &server_ca.pem);
    let admin = format!(
        "token = \"env:TG_ADMIN\"\ntls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}",
        write(dir.path(), "cert.pem", &cert).display(),
        write(dir.path(), "key.pem", &key).display(),
        write(dir.path(), "client-ca.pem", &client_ca.pem).display(),
    );
    let identity = write(dir.path(), "client.pem", &format!("{client_cert}{client_key}"));
    let stranger = write(dir.path(), "stranger.pem", &format!("{stranger_cert}{stranger_key}"));
    let mock = MockProvider::start(Behavior::default()).await.unwrap();
    let key = new_key();
    let gw =
        start_gateway_sections("", "", &admin, &[("TG_ADMIN", ADMIN_TOKEN)], &one_provider_config(&mock.url(), &key));

    let admin_client = |identity: Option<&Path>| {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(server_ca.pem.as_bytes()).unwrap());
        if let Some(p) = identity {
            b = b.identity(reqwest::Identity::from_pem(&std::fs::read(p).unwrap()).unwrap());
        }
        b.build().unwrap()
    };
    let url = format!("https://127.0.0.1:{}/healthz", gw.admin_port);
    assert_eq!(admin_client(Some(&identity)).get(&url).send().await.unwrap().status(), 200);
    assert!(admin_client(None).get(&url).send().await.is_err(), "no client certificate: no handshake");
    assert!(admin_client(Some(&stranger)).get(&url).send().await.is_err(), "a certificate from another CA: none");
    // Plain HTTP to it is not served either.
    assert!(client().get(format!("http://127.0.0.1:{}/healthz", gw.admin_port)).send().await.is_err());

    // The CLI finds the address (https) in the config and presents the certificate it is given.
    let cli = |cert: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["keys", "list", "--config"])
            .arg(&gw.config_path)
            .env("TG_ADMIN", ADMIN_TOKEN)
            .env("TOLLGATE_ADMIN_CA", &server_ca_path)
            .env("TOLLGATE_ADMIN_CLIENT_CERT", cert)
            .output()
            .unwrap()
    };
    let ok = cli(&identity);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains('a'), "{}", String::from_utf8_lossy(&ok.stdout));
    let refused = cli(&stranger);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot reach the admin API"));
}
