//! firstboot's HTTPS client for `imgbuild serve`: servers tried in order, the server trusted only
//! under the pinned CA, retries with exponential backoff and jitter until an overall deadline.
//!
//! One client serves a node's whole run, over one TLS 1.3 connection while it lasts (hyper on
//! tokio-rustls, so that the connection's exporter is at hand: see [`Client::post_bound`]). It
//! enrolls with a CSR bound to that connection; the server then treats the connection as the
//! node's, and [`Client::present`] makes every later connection show the certificate enrollment
//! returned. Only `https://` servers: the pin is a TLS check, and a credential never travels in
//! clear.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use proto::pin::CaPin;
use proto::tls::ClientIdentity;
use proto::wire::{CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN, ErrorBody, ErrorCode, channel_binding_text};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A request's whole time, and a connection's setup time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read (a master's config with its CA keys is ~60 KiB).
const MAX_RESPONSE: usize = 16 << 20;

/// Why a call of the enrollment server failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The network or the connection failed (worth retrying).
    #[error("cannot reach the enrollment server: {0}")]
    Transport(String),
    /// The server's certificate is not acceptable: retrying cannot help.
    #[error("refusing the enrollment server: {0}")]
    Untrusted(String),
    /// The server answered with an error.
    #[error("the enrollment server refused ({status}, {code}): {message}", code = .body.code.as_str(), message = .body.error)]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error the server gave.
        body: ErrorBody,
    },
    /// The answer (or the request) does not (de)serialize.
    #[error("unexpected answer from the enrollment server: {0}")]
    Decode(String),
    /// Still failing at the deadline (after this long; the last error).
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

    /// The server's error code, if it answered with one.
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
    /// The first wait's upper bound.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (from 0): uniform in [d/2, d].
    pub fn delay(&self, attempt: u32) -> Duration {
        let d = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let mut b = [0u8; 4];
        let r = SystemRandom::new().fill(&mut b).map(|_| u32::from_le_bytes(b)).unwrap_or(u32::MAX / 2);
        d / 2 + (d / 2).mul_f64(f64::from(r) / f64::from(u32::MAX))
    }

    /// Runs `attempt` until it succeeds, it fails for good, or the deadline would pass during
    /// the next wait; says what it retries. The one retry loop of the agent.
    pub async fn retry<T, E, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        attempt: impl FnMut() -> Fut,
        transient: impl Fn(&E) -> bool,
    ) -> Result<T, Retried<E>>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        self.retry_logged(what, deadline, attempt, transient, tracing::Level::WARN).await
    }

    /// [`Backoff::retry`] for waiting on something to become ready, which is expected to take a
    /// while: the attempts are logged at debug level only.
    pub async fn poll<T, E, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        attempt: impl FnMut() -> Fut,
    ) -> Result<T, Retried<E>>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        self.retry_logged(what, deadline, attempt, |_| true, tracing::Level::DEBUG).await
    }

    async fn retry_logged<T, E, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        mut attempt: impl FnMut() -> Fut,
        transient: impl Fn(&E) -> bool,
        level: tracing::Level,
    ) -> Result<T, Retried<E>>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let start = Instant::now();
        for n in 0.. {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) => {
                    let wait = self.delay(n);
                    if Instant::now() + wait > deadline {
                        return Err(Retried::Deadline(start.elapsed(), e));
                    }
                    if level == tracing::Level::WARN {
                        tracing::warn!("{what}: {e}; retrying in {:.1}s", wait.as_secs_f64());
                    } else {
                        tracing::debug!("{what}: {e}; again in {:.1}s", wait.as_secs_f64());
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(Retried::Final(e)),
            }
        }
        unreachable!("the loop returns")
    }
}

/// How a retried operation ended.
#[derive(Debug)]
pub enum Retried<E> {
    /// Failed for good (not transient).
    Final(E),
    /// Still failing at the deadline (after this long).
    Deadline(Duration, E),
}

/// One enrollment server: where to connect and the name its certificate must carry.
#[derive(Debug, Clone)]
struct Server {
    url: String,
    host: String,
    port: u16,
    name: ServerName<'static>,
}

/// Why an enrollment client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A server URL is not `https://`.
    #[error(
        "enrollment server '{0}' is not an https:// URL: the CA pin is a TLS check, and a credential never travels in clear"
    )]
    NotHttps(String),
    /// A server URL does not parse.
    #[error("enrollment server '{url}': {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pin, certificate or key does not make a TLS configuration.
    #[error("TLS client setup: {0}")]
    Tls(#[from] proto::tls::TlsError),
}

impl Server {
    fn parse(url: &str) -> Result<Server, SetupError> {
        let bad = |reason: &str| SetupError::Url { url: url.into(), reason: reason.into() };
        let rest = url.strip_prefix("https://").ok_or_else(|| SetupError::NotHttps(url.into()))?;
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("the port is not a number"))?)
            }
            _ => (authority, 443),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let name =
            ServerName::try_from(host.clone()).map_err(|_| bad("the host is neither an address nor a DNS name"))?;
        Ok(Server { url: url.trim_end_matches('/').to_string(), host, port, name })
    }
}

/// Makes a request's body for the connection it goes on (given its channel binding).
type BodyFor<'a> = dyn Fn(&str) -> Result<Option<Vec<u8>>, CallError> + Sync + 'a;

/// The open connection, with the channel binding its CSRs carry.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    binding: String,
    server: usize,
}

struct Inner {
    servers: Vec<Server>,
    tls: tokio_rustls::TlsConnector,
    identity: Arc<ClientIdentity>,
    conn: tokio::sync::Mutex<Option<Conn>>,
}

/// firstboot's client for `imgbuild serve`; clones share the connection and the identity.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// How calls are retried.
    pub backoff: Backoff,
    /// When retrying stops and calls fail with [`CallError::Deadline`].
    pub deadline: Instant,
}

impl Client {
    /// A client trusting the servers under `pin`, presenting `identity` (cert, key PEM) if given.
    pub fn new(
        servers: &[String],
        pin: CaPin,
        identity: Option<(&str, &str)>,
        deadline: Instant,
    ) -> Result<Self, SetupError> {
        let servers = servers.iter().map(|s| Server::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let identity = ClientIdentity::from_pem(identity)?;
        let tls = proto::tls::pinned_client_config(pin, identity.clone())?;
        let inner = Inner {
            servers,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            identity,
            conn: tokio::sync::Mutex::new(None),
        };
        Ok(Client { inner: Arc::new(inner), backoff: Backoff::default(), deadline })
    }

    /// Presents this client certificate (PEM) and key on every new connection.
    pub fn present(&self, cert_pem: &str, key_pem: &str) -> Result<(), SetupError> {
        Ok(self.inner.identity.set(cert_pem, key_pem)?)
    }

    /// Whether new connections show a client certificate.
    pub fn presents_certificate(&self) -> bool {
        self.inner.identity.is_set()
    }

    /// Connects to server `i`: TCP, the TLS 1.3 handshake under the pin, the connection's
    /// exporter value, HTTP/1.1.
    async fn dial(&self, i: usize) -> Result<Conn, CallError> {
        let s = &self.inner.servers[i];
        let transport = |e: String| CallError::Transport(format!("{}: {e}", s.url));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((s.host.as_str(), s.port)))
            .await
            .map_err(|_| transport("connecting timed out".into()))?
            .map_err(|e| transport(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, self.inner.tls.connect(s.name.clone(), tcp)).await {
            Err(_) => return Err(transport("the TLS handshake timed out".into())),
            Ok(Err(e)) if is_certificate_error(&e) => {
                return Err(CallError::Untrusted(format!("{}: {}", s.url, proto::error_chain(&e))));
            }
            Ok(Err(e)) => return Err(transport(proto::error_chain(&e))),
            Ok(Ok(t)) => t,
        };
        let mut exporter = [0u8; CHANNEL_BINDING_LEN];
        tls.get_ref()
            .1
            .export_keying_material(&mut exporter, CHANNEL_BINDING_LABEL, None)
            .map_err(|e| transport(format!("no TLS exporter: {e}")))?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| transport(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { send, binding: channel_binding_text(&exporter), server: i })
    }

    /// One attempt on each server in turn: the body is made for the connection it goes on.
    async fn once<R: DeserializeOwned>(
        &self,
        method: &hyper::Method,
        path: &str,
        body: &BodyFor<'_>,
    ) -> Result<R, CallError> {
        let mut guard = self.inner.conn.lock().await;
        let first = guard.as_ref().map_or(0, |c| c.server);
        let mut last = CallError::Transport("no enrollment server configured".into());
        for k in 0..self.inner.servers.len() {
            let i = (first + k) % self.inner.servers.len();
            if guard.as_ref().is_none_or(|c| c.server != i || c.send.is_closed()) {
                *guard = None;
                match self.dial(i).await {
                    Ok(c) => *guard = Some(c),
                    Err(e @ CallError::Untrusted(_)) => return Err(e),
                    Err(e) => {
                        last = e;
                        continue;
                    }
                }
            }
            // Set just above, or kept because it is this server's and open.
            let Some(conn) = guard.as_mut() else { continue };
            let url = format!("{}{path}", self.inner.servers[i].url);
            let payload = body(&conn.binding)?;
            let mut req = hyper::Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, format!("{}:{}", self.inner.servers[i].host, self.inner.servers[i].port));
            if payload.is_some() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(payload.unwrap_or_default())))
                .map_err(|e| CallError::Decode(format!("{url}: {e}")))?;
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let resp = conn.send.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let bytes =
                    Limited::new(resp.into_body(), MAX_RESPONSE).collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>((status, bytes))
            })
            .await;
            let (status, bytes) = match answer {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    *guard = None;
                    last = CallError::Transport(format!("{url}: {e}"));
                    continue;
                }
                Err(_) => {
                    *guard = None;
                    last = CallError::Transport(format!("{url}: no answer within {REQUEST_TIMEOUT:?}"));
                    continue;
                }
            };
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
    async fn call<R: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: &BodyFor<'_>,
    ) -> Result<R, CallError> {
        self.backoff
            .retry(path, self.deadline, || self.once(&method, path, body), CallError::is_transient)
            .await
            .map_err(|r| match r {
                Retried::Final(e) => e,
                Retried::Deadline(after, e) => CallError::Deadline(after, Box::new(e)),
            })
    }

    /// A JSON POST of `body` to `path`, retried; the answer deserialized.
    pub async fn post<B: Serialize, R: DeserializeOwned>(&self, path: &str, body: &B) -> Result<R, CallError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CallError::Decode(e.to_string()))?;
        self.call(hyper::Method::POST, path, &|_| Ok(Some(bytes.clone()))).await
    }

    /// A POST whose body is made for the connection it is sent on: `make` gets the connection's
    /// channel binding (RFC 9266 tls-exporter, base64), which an enrollment CSR carries.
    pub async fn post_bound<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        make: impl Fn(&str) -> Result<B, String> + Sync,
    ) -> Result<R, CallError> {
        self.call(hyper::Method::POST, path, &|binding| {
            let body = make(binding).map_err(CallError::Decode)?;
            serde_json::to_vec(&body).map(Some).map_err(|e| CallError::Decode(e.to_string()))
        })
        .await
    }

    /// A GET of `path`, retried; the answer deserialized.
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, CallError> {
        self.call(hyper::Method::GET, path, &|_| Ok(None)).await
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

    #[test]
    fn servers_must_be_https() {
        for (url, ok) in [
            ("https://192.168.3.100:9443", true),
            ("https://imgbuild.k8s.org", true),
            ("https://[fd00::1]:9443", true),
            ("http://192.168.3.100:9443", false),
            ("192.168.3.100:9443", false),
            ("https://:9443", false),
            ("https://host:port", false),
        ] {
            assert_eq!(Server::parse(url).is_ok(), ok, "{url}");
        }
        assert!(matches!(Server::parse("http://x:1"), Err(SetupError::NotHttps(_))));
        let s = Server::parse("https://[fd00::1]:9443/").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("fd00::1", 9443));
    }
}
