//! CA pins and the bootstrap signer's detached JWS.
//!
//! The pin is kubeadm's `--discovery-token-ca-cert-hash`: `sha256:` and the hex SHA-256 of the CA
//! certificate's DER SubjectPublicKeyInfo. The JWS is what kube-controller-manager's
//! `bootstrapsigner` puts under `jws-kubeconfig-<token-id>` in `kube-public/cluster-info`: a
//! detached compact JWS (`header..signature`), HS256 keyed with the token secret, over the
//! ConfigMap's `kubeconfig` value.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::token::BootstrapToken;

/// `sha256:<64 hex>` of a CA's SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

/// Why a pin or a certificate to pin cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The text (its first 80 characters) is not `sha256:` and 64 hex digits.
    #[error("'{0}' is not a CA pin (expected sha256: followed by 64 hex digits)")]
    Format(String),
    /// The certificate does not parse (the parser's reason).
    #[error("not a parsable X.509 certificate: {0}")]
    Certificate(String),
}

impl CaPin {
    /// The pin of a DER certificate.
    pub fn of_cert_der(der: &[u8]) -> Result<Self, PinError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PinError::Certificate(e.to_string()))?;
        Ok(Self::of_spki_der(cert.tbs_certificate.subject_pki.raw))
    }

    /// The pin of the first certificate in a PEM bundle.
    pub fn of_cert_pem(pem: &str) -> Result<Self, PinError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        let der =
            CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PinError::Certificate(format!("PEM: {e}")))?;
        Self::of_cert_der(&der)
    }

    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki_der(spki: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for CaPin {
    type Err = PinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PinError::Format(s.chars().take(80).collect());
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for CaPin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CaPin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The protected header the bootstrap signer writes (go-jose serializes it with sorted keys).
fn jws_header(token_id: &str) -> String {
    format!(r#"{{"alg":"HS256","kid":"{token_id}"}}"#)
}

/// The detached JWS (`header..signature`) of `payload` keyed with the token, byte for byte what
/// Kubernetes' bootstrap signer computes.
pub fn detached_jws(payload: &str, token: &BootstrapToken) -> String {
    let header = URL_SAFE_NO_PAD.encode(jws_header(token.id()));
    let signing_input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.secret().as_bytes());
    let sig = hmac::sign(&key, signing_input.as_bytes());
    format!("{header}..{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Why a `cluster-info` signature does not verify.
#[derive(Debug, thiserror::Error)]
pub enum JwsError {
    /// Not `header..signature` in base64url.
    #[error("not a detached JWS (expected header..signature)")]
    Format,
    /// The header (first) is not HS256 with the token id (second) as `kid`.
    #[error("JWS header is {0}, expected alg HS256 with kid {1}")]
    Header(String, String),
    /// The HMAC does not match with the token (its id).
    #[error("JWS signature does not verify with token {0}: cluster-info was not signed with this token")]
    Signature(String),
}

/// Verifies a detached JWS over `payload` with the token: header `alg` HS256, `kid` the token id,
/// and the HMAC (compared in constant time).
pub fn verify_detached_jws(jws: &str, payload: &str, token: &BootstrapToken) -> Result<(), JwsError> {
    let (header_b64, sig_b64) = jws.split_once("..").ok_or(JwsError::Format)?;
    let header_json = URL_SAFE_NO_PAD.decode(header_b64).map_err(|_| JwsError::Format)?;
    #[derive(Deserialize)]
    struct Header {
        alg: String,
        kid: Option<String>,
    }
    let header: Header = serde_json::from_slice(&header_json).map_err(|_| JwsError::Format)?;
    if header.alg != "HS256" || header.kid.as_deref() != Some(token.id()) {
        return Err(JwsError::Header(String::from_utf8_lossy(&header_json).into_owned(), token.id().to_string()));
    }
    let sig = URL_SAFE_NO_PAD.decode(sig_b64).map_err(|_| JwsError::Format)?;
    let signing_input = format!("{header_b64}.{}", URL_SAFE_NO_PAD.encode(payload));
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.secret().as_bytes());
    hmac::verify(&key, signing_input.as_bytes(), &sig).map_err(|_| JwsError::Signature(token.id().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_roundtrip_and_errors() {
        let p = CaPin([0xab; 32]);
        let s = p.to_string();
        assert_eq!(s.len(), 7 + 64);
        assert_eq!(s.parse::<CaPin>().unwrap(), p);
        for bad in ["sha256:zz", "md5:00", &s[..70], &format!("{s}0"), "sha256:é", ""] {
            assert!(bad.parse::<CaPin>().is_err(), "{bad}");
        }
    }

    #[test]
    fn jws_verifies_and_rejects_tampering() {
        let t: BootstrapToken = "abcdef.0123456789abcdef".parse().unwrap();
        let other: BootstrapToken = "abcdef.0123456789abcdee".parse().unwrap();
        let jws = detached_jws("apiVersion: v1\n", &t);
        assert!(jws.starts_with("eyJhbGciOiJIUzI1NiIsImtpZCI6ImFiY2RlZiJ9.."), "{jws}");
        verify_detached_jws(&jws, "apiVersion: v1\n", &t).unwrap();
        assert!(matches!(verify_detached_jws(&jws, "apiVersion: v2\n", &t), Err(JwsError::Signature(_))));
        assert!(matches!(verify_detached_jws(&jws, "apiVersion: v1\n", &other), Err(JwsError::Signature(_))));
        let wrong_kid: BootstrapToken = "zzzzzz.0123456789abcdef".parse().unwrap();
        assert!(matches!(verify_detached_jws(&jws, "apiVersion: v1\n", &wrong_kid), Err(JwsError::Header(..))));
        assert!(matches!(verify_detached_jws("nodots", "x", &t), Err(JwsError::Format)));
    }
}
