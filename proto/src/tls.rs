//! rustls configuration shared by every TLS client of the project (firstboot's enrollment client,
//! imgbuild's etcd client, tests): ring is the one crypto provider.
//!
//! [`pinned_client_config`] is how a node trusts `imgbuild serve` before it holds any CA: the
//! server must present, in its chain, a CA certificate whose SubjectPublicKeyInfo hashes to the
//! pin from the payload, and its certificate must verify against that CA (signature, validity,
//! name). Anything else fails closed with a message naming both pins.
//!
//! The certificate a client presents is a [`ClientIdentity`] that can be set after the config is
//! built: a node enrolls without one and presents the certificate it got on every later
//! connection. Clients never resume sessions: a resumed session would carry the identity of the
//! first handshake, not the one the client holds now.

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::pin::CaPin;

/// The project's crypto provider: ring, with AES-128-GCM-SHA256 first among the TLS 1.3 suites
/// (SHA-256 has CPU instructions on current x86 and ARM servers, SHA-384 does not; AES-128 is as
/// safe as AES-256 here and cheaper).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != TLS13_AES_128_GCM_SHA256.suite());
    Arc::new(p)
}

/// Makes ring the process-wide default provider, for clients built without an explicit
/// configuration (plain-HTTP ones included: reqwest asks for a provider either way). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a TLS client configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key does not parse.
    #[error("{what}: {reason}")]
    Pem {
        /// What the PEM was meant to hold (`client certificate`, `CA certificate`).
        what: &'static str,
        /// The parser's reason.
        reason: String,
    },
    /// rustls refused a certificate, key or setting.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Every certificate in a PEM bundle, in order; `what` names the bundle in errors.
pub fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, reason: "no certificate in PEM".into() });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM text; `what` names it in errors.
pub fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem { what, reason: e.to_string() })
}

/// The client certificate and key a client presents, if any; settable while the client is in use.
#[derive(Debug, Default)]
pub struct ClientIdentity(RwLock<Option<Arc<CertifiedKey>>>);

impl ClientIdentity {
    /// An identity presenting `client` (certificate PEM chain, key PEM), or nothing when `None`.
    pub fn from_pem(client: Option<(&str, &str)>) -> Result<Arc<Self>, TlsError> {
        let identity = Arc::new(ClientIdentity::default());
        if let Some((cert, key)) = client {
            identity.set(cert, key)?;
        }
        Ok(identity)
    }

    /// Presents this certificate (PEM chain) and key on every connection from now on.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let certs = certs_from_pem(cert_pem, "client certificate")?;
        let certified = CertifiedKey::from_der(certs, key_from_pem(key_pem, "client key")?, &provider())?;
        #[expect(
            clippy::expect_used,
            reason = "the lock is only held to read or assign an Arc, which cannot panic: it is never poisoned"
        )]
        let mut identity = self.0.write().expect("identity lock");
        *identity = Some(Arc::new(certified));
        Ok(())
    }

    /// Whether a certificate is presented.
    #[expect(
        clippy::expect_used,
        reason = "the lock is only held to read or assign an Arc, which cannot panic: it is never poisoned"
    )]
    pub fn is_set(&self) -> bool {
        self.0.read().expect("identity lock").is_some()
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        #[expect(
            clippy::expect_used,
            reason = "the lock is only held to read or assign an Arc, which cannot panic: it is never poisoned"
        )]
        let certified = self.0.read().expect("identity lock").clone()?;
        certified.key.choose_scheme(schemes).is_some().then_some(certified)
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

fn finish(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    identity: Arc<ClientIdentity>,
) -> ClientConfig {
    let mut cfg = builder.with_client_cert_resolver(identity);
    cfg.resumption = Resumption::disabled();
    // A node makes a handful of requests per connection: HTTP/2 would only add frames.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// A client trusting only the CA(s) in `ca_pem`, optionally presenting a client certificate.
pub fn client_config(ca_pem: &str, client: Option<(&str, &str)>) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(ca_pem, "CA certificate")? {
        roots.add(c)?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(finish(builder, ClientIdentity::from_pem(client)?))
}

/// A client that trusts the server only under the CA with this pin, presenting `identity`.
pub fn pinned_client_config(pin: CaPin, identity: Arc<ClientIdentity>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier =
        Arc::new(PinnedCa { pin, algorithms: provider.signature_verification_algorithms, provider: provider.clone() });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(finish(builder, identity))
}

#[derive(Debug)]
struct PinnedCa {
    pin: CaPin,
    algorithms: WebPkiSupportedAlgorithms,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| CaPin::of_cert_der(c).is_ok_and(|p| p == self.pin)) else {
            let presented: Vec<String> = std::iter::once(end_entity)
                .chain(intermediates)
                .filter_map(|c| CaPin::of_cert_der(c).ok().map(|p| p.to_string()))
                .collect();
            return Err(rustls::Error::General(format!(
                "the server is not under the pinned CA {} (its chain has {}); refusing to trust it",
                self.pin,
                presented.join(", ")
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
