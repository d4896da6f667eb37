//! TLS on the listeners: certificates that a reload re-reads from disk (a renewed certificate
//! takes effect without a restart), and optional client-certificate checks (mTLS).
//!
//! Pingora builds one rustls config per listener at start. The certificate is served through a
//! resolver that holds the current one, so a reload only swaps what the resolver hands out;
//! connections already open keep the certificate they were made with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, RootCertStore, WebPkiClientVerifier};

use crate::config::TlsConfig;

/// One listener's certificate and key, re-readable.
#[derive(Debug)]
pub struct ReloadableCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        let current = ArcSwap::from_pointee(read(cert, key)?);
        Ok(ReloadableCert { cert: cert.to_owned(), key: key.to_owned(), current })
    }

    /// Reads the files again. On any error the certificate in use stays.
    pub fn prepare(&self) -> Result<PreparedCert<'_>, String> {
        Ok(PreparedCert { target: self, loaded: read(&self.cert, &self.key)? })
    }
}

/// A certificate read and checked, to be put in use once the rest of a reload has succeeded.
pub struct PreparedCert<'a> {
    target: &'a ReloadableCert,
    loaded: CertifiedKey,
}

impl PreparedCert<'_> {
    pub fn install(self) {
        self.target.current.store(Arc::new(self.loaded));
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    pingora::tls::install_default_crypto_provider();
    let (certs, key_der) =
        pingora::tls::load_certs_and_key_files(&cert.display().to_string(), &key.display().to_string())
            .map_err(|e| format!("cannot read {} or {}: {e}", cert.display(), key.display()))?
            .ok_or_else(|| format!("{} holds no certificate, or {} no private key", cert.display(), key.display()))?;
    let provider = CryptoProvider::get_default().ok_or("no TLS crypto provider is installed")?;
    let signing =
        provider.key_provider.load_private_key(key_der).map_err(|e| format!("private key {}: {e}", key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    // A key that does not belong to the certificate would fail every handshake: refuse it now.
    certified
        .keys_match()
        .map_err(|e| format!("{} and {} do not belong together: {e}", cert.display(), key.display()))?;
    Ok(certified)
}

/// Pingora TLS settings for a listener (TLS 1.2 and 1.3 only, as Pingora's rustls builder has
/// them), and the certificate handle a reload refreshes.
pub fn listener_settings(tls: &TlsConfig) -> anyhow::Result<(TlsSettings, Arc<ReloadableCert>)> {
    let cert = Arc::new(ReloadableCert::load(&tls.cert, &tls.key).map_err(anyhow::Error::msg)?);
    // The paths are only read by Pingora when no resolver is set; the resolver serves instead.
    let mut settings = TlsSettings::intermediate("", "").context("TLS settings")?;
    settings.set_cert_resolver(cert.clone());
    if let Some(ca) = &tls.client_ca {
        let mut roots = RootCertStore::empty();
        pingora::tls::load_ca_file_into_store(ca, &mut roots)
            .map_err(|e| anyhow::anyhow!("client_ca {}: {e}", ca.display()))?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .with_context(|| format!("client_ca {}", ca.display()))?;
        settings.set_client_cert_verifier(verifier);
    }
    Ok((settings, cert))
}
