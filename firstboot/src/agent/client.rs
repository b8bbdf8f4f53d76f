//! firstboot's HTTPS client for `imgbuild serve`: servers tried in order, the server trusted only
//! under the pinned CA, retries with exponential backoff and jitter until an overall deadline.
//!
//! One client serves a node's whole run. It enrolls with the token and no certificate; the server
//! then treats that connection as the node's, and [`Client::present`] makes every later
//! connection show the certificate enrollment returned.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use serde::de::DeserializeOwned;

use proto::pin::CaPin;
use proto::tls::ClientIdentity;
use proto::wire::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach the enrollment server: {0}")]
    Transport(String),
    /// The server's certificate is not acceptable: retrying cannot help.
    #[error("refusing the enrollment server: {0}")]
    Untrusted(String),
    #[error("the enrollment server refused ({status}, {code:?}): {message}", code = .body.code, message = .body.error)]
    Api { status: u16, body: ErrorBody },
    #[error("unexpected answer from the enrollment server: {0}")]
    Decode(String),
    #[error("gave up after {0:?} (deadline): {1}")]
    Deadline(Duration, Box<CallError>),
}

impl CallError {
    /// Worth trying again: the network, an overloaded or restarting server.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Api { body, .. } => body.code.is_transient(),
            CallError::Untrusted(_) | CallError::Decode(_) | CallError::Deadline(..) => false,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Api { body, .. } => Some(body.code),
            CallError::Deadline(_, inner) => inner.code(),
            _ => None,
        }
    }
}

/// Exponential backoff with jitter: each wait is uniform in [d/2, d], d doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let d = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let mut b = [0u8; 4];
        let r = SystemRandom::new().fill(&mut b).map(|_| u32::from_le_bytes(b)).unwrap_or(u32::MAX / 2);
        d / 2 + (d / 2).mul_f64(f64::from(r) / f64::from(u32::MAX))
    }
}

#[derive(Clone)]
pub struct Client {
    servers: Vec<String>,
    http: reqwest::Client,
    identity: Arc<ClientIdentity>,
    pub backoff: Backoff,
    pub deadline: Instant,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS client setup: {0}")]
pub struct SetupError(String);

impl Client {
    /// A client trusting the servers under `pin`, presenting `identity` (cert, key PEM) if given.
    pub fn new(
        servers: &[String],
        pin: CaPin,
        identity: Option<(&str, &str)>,
        deadline: Instant,
    ) -> Result<Self, SetupError> {
        let identity = ClientIdentity::from_pem(identity).map_err(|e| SetupError(e.to_string()))?;
        let tls = proto::tls::pinned_client_config(pin, identity.clone()).map_err(|e| SetupError(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SetupError(e.to_string()))?;
        Ok(Client { servers: servers.to_vec(), http, identity, backoff: Backoff::default(), deadline })
    }

    /// Presents this client certificate (PEM) and key on every new connection.
    pub fn present(&self, cert_pem: &str, key_pem: &str) -> Result<(), SetupError> {
        self.identity.set(cert_pem, key_pem).map_err(|e| SetupError(e.to_string()))
    }

    pub fn presents_certificate(&self) -> bool {
        self.identity.is_set()
    }

    async fn once<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, CallError> {
        let mut last = CallError::Transport("no enrollment server configured".into());
        for base in &self.servers {
            let url = format!("{}{path}", base.trim_end_matches('/'));
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if is_certificate_error(&e) => {
                    return Err(CallError::Untrusted(format!("{url}: {}", error_chain(&e))));
                }
                Err(e) => {
                    last = CallError::Transport(format!("{url}: {}", error_chain(&e)));
                    continue;
                }
            };
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| CallError::Transport(format!("{url}: {e}")))?;
            if status.is_success() {
                let text = if bytes.is_empty() { "null".as_bytes() } else { &bytes[..] };
                return serde_json::from_slice(text).map_err(|e| CallError::Decode(format!("{url}: {e}")));
            }
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                code: if status.is_server_error() { ErrorCode::Internal } else { ErrorCode::BadRequest },
                error: String::from_utf8_lossy(&bytes).chars().take(300).collect(),
            });
            return Err(CallError::Api { status: status.as_u16(), body });
        }
        Err(last)
    }

    /// One call, retried while the error is transient and the deadline allows.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, CallError> {
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            match self.once(method.clone(), path, body).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_transient() => {
                    let wait = self.backoff.delay(attempt);
                    if Instant::now() + wait > self.deadline {
                        return Err(CallError::Deadline(start.elapsed(), Box::new(e)));
                    }
                    tracing::warn!("{path}: {e}; retrying in {:.1}s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R, CallError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, CallError> {
        self.call::<(), R>(reqwest::Method::GET, path, None).await
    }
}

/// Did TLS reject the server's certificate (as opposed to the network failing)?
fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(r) = c.downcast_ref::<rustls::Error>() {
            return matches!(r, rustls::Error::InvalidCertificate(_) | rustls::Error::General(_));
        }
        // io::Error's source() skips its payload: step into the payload instead.
        cur = match c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

pub use proto::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        for attempt in 0..10 {
            let d = b.delay(attempt);
            let full = Duration::from_millis(100).saturating_mul(1 << attempt).min(Duration::from_secs(2));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?} outside [{:?}, {full:?}]", full / 2);
        }
        let samples: std::collections::HashSet<u128> = (0..20).map(|_| b.delay(3).as_nanos()).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
