//! HTTP handlers of the enrollment API: each parses, checks who is asking, and hands over to
//! [`Fleet`]. Every request carries the [`Peer`] its TLS connection is: the client certificate
//! (a node's enrollment certificate, or the operator's admin identity) and the connection's
//! channel binding. A connection on which a machine just enrolled speaks for that node from then
//! on, as if it had shown the certificate it was given: its CSR, bound to this very connection,
//! proved the key, and the node need not pay a second handshake to use it.
//!
//! Who may call what (docs/security.md has the whole table):
//!
//! | path | who |
//! |---|---|
//! | `/healthz`, `/metrics`, `/v1/payload/...` | anyone: nothing there can obtain a secret |
//! | `/v1/enroll` | anyone, with a bound CSR; what it gets depends on what it proves |
//! | `/v1/config`, `/v1/sign`, `/v1/report`, `/v1/bootstrap-lease` | the node, by its certificate |
//! | `/v1/nodes...` | the operator's admin identity |

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use proto::wire::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::fleet::records::NodeRecord;
use super::fleet::{ApiError, Fleet};
use super::render::Renderer;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address and port.
    pub addr: SocketAddr,
    /// The client certificate's holder.
    pub client: Option<Client>,
    /// The node that enrolled on this connection.
    pub enrolled: Arc<OnceLock<Client>>,
    /// This connection's channel binding (RFC 9266), as an enrollment CSR must carry it.
    pub binding: Option<String>,
}

impl Peer {
    /// A peer that has not enrolled on this connection (yet).
    pub fn new(addr: SocketAddr, client: Option<Client>, binding: Option<String>) -> Self {
        Peer { addr, client, enrolled: Arc::default(), binding }
    }

    fn client(&self) -> Option<&Client> {
        self.client.as_ref().or_else(|| self.enrolled.get())
    }
}

/// Who a client certificate (or an enrollment on the connection) says the client is.
#[derive(Debug, Clone)]
pub enum Client {
    /// A node's enrollment certificate: its CN is the node name.
    Node {
        /// The node's name.
        name: String,
        /// The certificate's DER SubjectPublicKeyInfo, compared with the bound key.
        spki: Vec<u8>,
    },
    /// The operator (the state dir's admin identity).
    Admin {
        /// The certificate's CN.
        name: String,
    },
}

impl Client {
    /// The node an enrollment certificate speaks for.
    pub fn node(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<Client> {
        let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        Some(Client::Node { name, spki: cert.public_key().raw.to_vec() })
    }

    fn node_from_pem(pem: &str) -> Option<Client> {
        let der = proto::tls::certs_from_pem(pem, "client certificate").ok()?.into_iter().next()?;
        Client::node(&x509_parser::parse_x509_certificate(&der).ok()?.1)
    }
}

/// What every handler shares: the enrollment core, the config renderer, the state dir.
pub struct App {
    /// The enrollment core.
    pub fleet: Fleet,
    /// Renders node configs and the cluster objects.
    pub renderer: Renderer,
    /// The state directory, for the open payloads (its CA pin).
    pub state: crate::state::State,
    limiter: RateLimiter,
}

impl App {
    /// `failures_per_minute`: refused enrollments a source may have before it is answered 429.
    pub fn new(fleet: Fleet, renderer: Renderer, state: crate::state::State, failures_per_minute: u32) -> Self {
        App { fleet, renderer, state, limiter: RateLimiter { max: failures_per_minute, failures: Mutex::default() } }
    }
}

/// Failed enrollments per source address: after `max` in a window, the source is answered 429
/// until the window ends.
struct RateLimiter {
    max: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl RateLimiter {
    fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        let map = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(&ip) {
            Some((start, n)) if *n >= self.max && start.elapsed() < WINDOW => Err(ApiError::new(
                ErrorCode::RateLimited,
                format!("too many failed attempts from {ip}; retry in {}s", (WINDOW - start.elapsed()).as_secs() + 1),
            )),
            _ => Ok(()),
        }
    }

    fn failed(&self, ip: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
        if map.len() > 100_000 {
            map.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::UnsupportedProtocol => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidToken
        | ErrorCode::TokenExpired
        | ErrorCode::TokenRevoked
        | ErrorCode::NotEnrolled
        | ErrorCode::Revoked => StatusCode::UNAUTHORIZED,
        ErrorCode::TokenExhausted | ErrorCode::Refused | ErrorCode::CsrRefused => StatusCode::FORBIDDEN,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (status_of(self.code), axum::Json(ErrorBody { code: self.code, error: self.message })).into_response()
    }
}

type ApiResult<T> = Result<axum::Json<T>, ApiError>;

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("request body: {e}")))
}

fn ok<T: Serialize>(v: T) -> ApiResult<T> {
    Ok(axum::Json(v))
}

/// The enrollment API and the operator's calls over `app`, with the request body limit.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(PATH_ENROLL, post(enroll))
        .route(PATH_CONFIG, get(config))
        .route(PATH_SIGN, post(sign))
        .route(PATH_REPORT, post(report))
        .route(PATH_BOOTSTRAP_LEASE, post(lease))
        .route(PATH_PAYLOAD_ROLE, get(payload_role))
        .route(PATH_PAYLOAD_NODE, get(payload_node))
        .route(PATH_NODES, get(nodes))
        .route(PATH_NODES_APPROVE, post(approve))
        .route(PATH_NODES_RESET, post(reset))
        .route(PATH_NODES_REVOKE, post(revoke))
        .route(PATH_METRICS, get(metrics))
        .route(PATH_HEALTH, get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(limits::BODY))
        .with_state(app)
}

async fn enroll(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<EnrollResponse> {
    app.fleet.metrics().request();
    let ip = peer.addr.ip();
    app.limiter.check(ip)?;
    let req: EnrollRequest = parse(&body).inspect_err(|_| app.limiter.failed(ip))?;
    let binding =
        peer.binding.as_deref().ok_or_else(|| ApiError::new(ErrorCode::Internal, "no TLS channel binding"))?;
    match app.fleet.enroll(req, ip, binding).await {
        Ok(r) => {
            if let (None, Some(node)) = (&peer.client, r.client_cert.as_deref().and_then(Client::node_from_pem)) {
                let _ = peer.enrolled.set(node);
            }
            ok(r)
        }
        Err(e) => {
            if e.code != ErrorCode::Internal {
                app.limiter.failed(ip);
            }
            Err(e)
        }
    }
}

/// The enrolled node behind this connection's client certificate.
async fn node(app: &App, peer: &Peer) -> Result<NodeRecord, ApiError> {
    app.fleet.metrics().request();
    match peer.client() {
        Some(Client::Node { name, spki }) => app.fleet.authenticate(name, spki).await,
        _ => Err(ApiError::new(ErrorCode::NotEnrolled, "this call needs the client certificate from enrollment")),
    }
}

async fn config(State(app): State<Arc<App>>, Extension(peer): Extension<Peer>) -> ApiResult<NodeConfig> {
    let node = node(&app, &peer).await?;
    ok(app.renderer.node_config(&node, &app.fleet.tokens()?)?)
}

async fn sign(State(app): State<Arc<App>>, Extension(peer): Extension<Peer>, body: Bytes) -> ApiResult<SignResponse> {
    let node = node(&app, &peer).await?;
    ok(app.fleet.sign(&node.name, parse(&body)?, peer.addr.ip()).await?)
}

async fn report(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let node = node(&app, &peer).await?;
    app.fleet.report(&node.name, parse(&body)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn lease(State(app): State<Arc<App>>, Extension(peer): Extension<Peer>, body: Bytes) -> ApiResult<LeaseResponse> {
    let node = node(&app, &peer).await?;
    let req: LeaseRequest = parse(&body)?;
    let tokens = app.fleet.tokens()?;
    ok(app.fleet.lease(&node, req.action, || app.renderer.cluster_objects(&tokens, node.image.as_ref())).await?)
}

fn admin(app: &App, peer: &Peer) -> Result<(), ApiError> {
    app.fleet.metrics().request();
    match &peer.client {
        Some(Client::Admin { .. }) => Ok(()),
        _ => Err(ApiError::new(ErrorCode::NotEnrolled, "this call needs the admin identity (pki/imgbuild-admin.*)")),
    }
}

async fn nodes(State(app): State<Arc<App>>, Extension(peer): Extension<Peer>) -> ApiResult<Vec<NodeStatus>> {
    admin(&app, &peer)?;
    ok(app.fleet.status().await?)
}

async fn approve(State(app): State<Arc<App>>, Extension(peer): Extension<Peer>, body: Bytes) -> ApiResult<NodeStatus> {
    admin(&app, &peer)?;
    ok(app.fleet.approve(&parse(&body)?).await?)
}

async fn reset(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    admin(&app, &peer)?;
    let req: ResetRequest = parse(&body)?;
    app.fleet.reset(&req.node).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<RevokeResponse> {
    admin(&app, &peer)?;
    ok(app.fleet.revoke(&parse(&body)?).await?)
}

/// Counts only; the machine gauges are refreshed at most every [`super::metrics::GAUGES_EVERY`].
async fn metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let m = app.fleet.metrics();
    if m.gauges_due() {
        m.set_machines(&app.fleet.status().await?);
    }
    Ok(([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], m.render()).into_response())
}

/// The open payload of a role or node: where the server is and its pin, never a credential.
fn payload_for(app: &App, target: crate::payload::Target<'_>, peer: &Peer) -> Result<Response, ApiError> {
    let cfg = crate::payload::open_config(&app.state, app.fleet.cluster(), &target)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let who = target.node.map_or_else(|| target.role.to_string(), |n| n.name.clone());
    app.fleet.audit().line("payload", &[("for", &who), ("source", &peer.addr.ip().to_string())]);
    Ok(([(header::CONTENT_TYPE, "application/json")], crate::payload::config_json(&cfg)).into_response())
}

/// GET /v1/payload/role/ROLE: the role's open payload (PXE nodes fetch it at boot).
async fn payload_role(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    axum::extract::Path(role): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    app.fleet.metrics().request();
    let role: proto::Role =
        role.parse().map_err(|e: proto::role::UnknownRole| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
    payload_for(&app, crate::payload::Target { role, node: None }, &peer)
}

/// GET /v1/payload/node/NAME: one node's open payload, with its static address.
async fn payload_node(
    State(app): State<Arc<App>>,
    Extension(peer): Extension<Peer>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    app.fleet.metrics().request();
    let node = app
        .fleet
        .cluster()
        .node(&name)
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, format!("no node {name} in the inventory")))?;
    payload_for(&app, crate::payload::Target { role: node.role, node: Some(node) }, &peer)
}
