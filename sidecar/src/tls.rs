//! rustls configuration: the serving certificate (from `--cert-path` or
//! self-signed) and the per-stage upstream client configs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The serving certificate: `dir/tls.crt` + `dir/tls.key`, or a fresh
/// self-signed one. With a directory it is watched: new files (a Kubernetes
/// Secret update swaps a symlink) replace the certificate for new
/// handshakes, open connections keep theirs. Files missing at start (a
/// Secret not mounted yet) mean a self-signed certificate until they appear,
/// as llm-d's sidecar does.
#[derive(Debug)]
pub struct CertStore {
    dir: Option<PathBuf>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The bytes of the files now served (None: self-signed).
    loaded: Mutex<Option<Vec<u8>>>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn self_signed() -> Result<Arc<CertifiedKey>, String> {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| format!("generating a self-signed certificate: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.key_pair.serialize_der()));
    CertifiedKey::from_der(vec![generated.cert.der().clone()], key, &provider())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// PEM bytes of `tls.crt` and `tls.key`.
type PemPair = (Vec<u8>, Vec<u8>);

/// The certificate and key files' bytes, None when either is missing.
fn read_pair(dir: &Path) -> Result<Option<PemPair>, String> {
    let read = |name: &str| match std::fs::read(dir.join(name)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "--cert-path: reading {}: {e}",
            dir.join(name).display()
        )),
    };
    Ok(match (read("tls.crt")?, read("tls.key")?) {
        (Some(c), Some(k)) => Some((c, k)),
        _ => None,
    })
}

fn parse_pair(dir: &Path, crt: &[u8], key: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let crt_path = dir.join("tls.crt");
    let certs = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--cert-path: reading {}: {e}", crt_path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--cert-path: no certificate in {}",
            crt_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        format!(
            "--cert-path: reading {}: {e}",
            dir.join("tls.key").display()
        )
    })?;
    CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(|e| format!("--cert-path: {e}"))
}

impl CertStore {
    /// Loads `dir`'s certificate (an error when the files are there but
    /// unusable), or a self-signed one.
    pub fn load(dir: Option<&Path>) -> Result<Arc<CertStore>, String> {
        let (current, loaded) = match dir {
            None => (self_signed()?, None),
            Some(d) => match read_pair(d)? {
                Some((crt, key)) => {
                    let ck = parse_pair(d, &crt, &key)?;
                    (ck, Some([crt, key].concat()))
                }
                None => {
                    tracing::warn!(
                        dir = %d.display(),
                        "--cert-path has no tls.crt/tls.key yet: serving a self-signed certificate until they appear"
                    );
                    (self_signed()?, None)
                }
            },
        };
        Ok(Arc::new(CertStore {
            dir: dir.map(Path::to_path_buf),
            current: RwLock::new(current),
            loaded: Mutex::new(loaded),
        }))
    }

    /// Takes new files if they changed; true when the certificate was
    /// replaced. Unusable files leave the current certificate in place.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let Some((crt, key)) = read_pair(dir)? else {
            return Ok(false);
        };
        let bytes = [crt.as_slice(), key.as_slice()].concat();
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.as_deref() == Some(bytes.as_slice()) {
            return Ok(false);
        }
        let ck = parse_pair(dir, &crt, &key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = ck;
        *loaded = Some(bytes);
        Ok(true)
    }

    /// Checks the files every `interval` for as long as the store is used.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        if self.dir.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_error = None;
            loop {
                tokio::time::sleep(interval).await;
                let Some(store) = weak.upgrade() else { break };
                match store.reload() {
                    Ok(true) => {
                        last_error = None;
                        tracing::info!("serving certificate reloaded from --cert-path");
                    }
                    Ok(false) => last_error = None,
                    // Half-written files are normal during an update: say it
                    // once per distinct problem, keep serving the old one.
                    Err(e) if last_error.as_ref() != Some(&e) => {
                        tracing::warn!(error = %e, "new certificate files not usable yet; keeping the current one");
                        last_error = Some(e);
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

/// How often `--cert-path` is checked for new files
/// (`TANDEM_CERT_RELOAD_INTERVAL_MS`, default 2 s).
pub fn cert_reload_interval() -> Duration {
    crate::server::env_duration_ms("TANDEM_CERT_RELOAD_INTERVAL_MS", 2_000)
}

/// Serving config over `store`: HTTP/2 or HTTP/1.1, as the client picks (ALPN).
pub fn server_config_with(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Client config for one upstream stage; `insecure` skips certificate checks
/// (in-cluster engines commonly serve self-signed certificates). Verified
/// certificates chain to the host's trust store (`SSL_CERT_FILE`,
/// `SSL_CERT_DIR`, else the system's, as Go's client in llm-d's sidecar) or
/// to the Mozilla roots built in.
pub fn client_config(insecure: bool) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    // hyper-rustls sets ALPN itself.
    if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "reading the host's trusted certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "the host's trusted certificates");
        builder.with_root_certificates(roots).with_no_client_auth()
    }
}

#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_config_builds() {
        assert!(server_config_with(CertStore::load(None).unwrap()).is_ok());
    }

    fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join("tls.crt"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), c.key_pair.serialize_pem()).unwrap();
        c.cert.der().to_vec()
    }

    fn served(store: &CertStore) -> Vec<u8> {
        store.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn certificates_are_taken_up_when_they_change_and_bad_files_are_ignored() {
        let dir = std::env::temp_dir().join(format!("tandem-certs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // Nothing mounted yet: self-signed, no error.
        let store = CertStore::load(Some(&dir)).unwrap();
        let first = served(&store);
        assert!(!store.reload().unwrap());
        let a = write_pair(&dir, "a.test");
        assert!(store.reload().unwrap());
        assert_eq!(served(&store), a);
        assert_ne!(a, first);
        assert!(!store.reload().unwrap(), "unchanged files are not reloaded");
        // A half-written update: the old certificate stays.
        std::fs::write(dir.join("tls.crt"), "-----BEGIN CERTIFICATE-----\nAAAA").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(served(&store), a);
        let b = write_pair(&dir, "b.test");
        assert!(store.reload().unwrap());
        assert_eq!(served(&store), b);
        // Files present but unusable at start are an error, not a silent fallback.
        std::fs::write(dir.join("tls.key"), "not a key").unwrap();
        assert!(CertStore::load(Some(&dir)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
