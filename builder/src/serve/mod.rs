//! `imgbuild serve`: the HTTPS enrollment server (rustls, TLS 1.3, HTTP/1.1, graceful shutdown).
//! Machines enroll with their credential (or wait for approval) on a connection their CSR is
//! bound to, then authenticate with the client certificate they got; the operator uses the
//! state dir's admin identity (`pki/imgbuild-admin.*`) for `imgbuild nodes`. Who may do what is
//! docs/security.md.
//!
//! Layers: [`conn`] (connections and their limits) → [`api`] (HTTP) → [`fleet`] (enrollment
//! logic) → [`store`] (durable state); [`render`] makes each node's config.

pub mod api;
pub mod audit;
pub mod boot;
pub mod conn;
pub mod fleet;
pub mod metrics;
pub mod render;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use self::api::{App, Client, Peer};
use self::audit::Audit;
use self::fleet::{Cas, Fleet, TokenSource};
use self::render::Renderer;
use self::store::{EtcdConfig, EtcdStore, RedbStore, Store};
use crate::pki::CaKind;
use crate::state::State;

/// Where the server keeps its state.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `store/fleet.redb` in the state dir.
    Embedded,
    /// An etcd cluster, shared with other replicas (an empty prefix becomes `/imgbuild/<cluster>/`).
    Etcd(EtcdConfig),
}

/// How `imgbuild serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the HTTPS API listens (port 0: any free port, see [`Running::addr`]).
    pub listen: SocketAddr,
    /// Where the server keeps its state.
    pub backend: Backend,
    /// Write the audit log to `audit.log` in the state dir (off in benchmarks).
    pub audit_file: bool,
    /// Serve PXE sets and iPXE scripts over plain HTTP on this address, from this directory.
    pub boot: Option<boot::BootListen>,
    /// Connection, time and rate limits.
    pub limits: conn::Limits,
}

/// How long connections may take to finish after a shutdown request.
const DRAIN: Duration = Duration::from_secs(10);

/// A server that is listening.
pub struct Running {
    /// The address the HTTPS API listens on.
    pub addr: SocketAddr,
    /// The plain-HTTP boot listener, when there is one.
    pub boot_addr: Option<SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The handlers' shared state (tests reach the fleet through it).
    pub app: Arc<App>,
}

impl Running {
    /// Stops accepting, lets open requests finish (up to 10 s), then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down: finishing open requests");
        self.shutdown().await;
    }
}

fn open_store(state: &State, cluster: &crate::cluster::Cluster, backend: &Backend) -> Result<Store> {
    Ok(match backend {
        Backend::Embedded => {
            let dir = state.store_dir();
            proto::fsutil::ensure_dir(&dir, 0o700).with_context(|| format!("cannot create {}", dir.display()))?;
            Store::Redb(RedbStore::open(&dir.join("fleet.redb"))?)
        }
        Backend::Etcd(cfg) => {
            let mut cfg = cfg.clone();
            if cfg.prefix.is_empty() {
                cfg.prefix = format!("/imgbuild/{}/", cluster.name);
            }
            Store::Etcd(EtcdStore::new(cfg)?)
        }
    })
}

/// Loads the state dir, opens the store and starts listening.
pub async fn start(state: &State, opts: &ServeOptions) -> Result<Running> {
    let cluster = state.cluster()?;
    let cas = Cas {
        cluster: state.ca(CaKind::Cluster)?,
        etcd: state.ca(CaKind::Etcd)?,
        front_proxy: state.ca(CaKind::FrontProxy)?,
        enrollment: state.ca(CaKind::Enrollment)?,
    };
    let tls = server_tls(state, &cas)?;
    let store = open_store(state, &cluster, &opts.backend)?;
    let audit = if opts.audit_file {
        let path = state.root.join("audit.log");
        Audit::open(&path).with_context(|| format!("cannot open {}", path.display()))?
    } else {
        Audit::log_only()
    };
    let renderer = Renderer::new(state, &cluster)?;
    let describe = store.describe();
    let enroll_subject = subject_raw(cas.enrollment.cert_der());
    let tokens = Arc::new(TokenSource::new(state.tokens_file()));
    let fleet = Fleet::new(store, cluster, cas, tokens, audit);
    let app = Arc::new(App::new(fleet, renderer, state.clone(), opts.limits.failures_per_minute));
    let listener = TcpListener::bind(opts.listen).await.with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!("enrollment server on https://{addr} (store: {describe})");
    let (shutdown, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let boot_addr = match &opts.boot {
        None => None,
        Some(b) => {
            let l = TcpListener::bind(b.addr).await.with_context(|| format!("cannot listen on {}", b.addr))?;
            let a = l.local_addr()?;
            tracing::info!("PXE boot files on http://{a} from {} (root: {})", b.dir.display(), b.root.as_str());
            let files = boot::BootFiles { app: app.clone(), dir: b.dir.clone(), root: b.root };
            let router = boot::router(Arc::new(files));
            let peer = |remote: SocketAddr, _: Option<&rustls::ServerConnection>| remote;
            tasks.push(tokio::spawn(conn::serve(l, None, router, opts.limits, peer, stop.clone())));
            Some(a)
        }
    };
    let peer = move |remote: SocketAddr, tls: Option<&rustls::ServerConnection>| {
        let client =
            tls.and_then(|c| c.peer_certificates()).and_then(|c| c.first()).and_then(|c| classify(c, &enroll_subject));
        Peer::new(remote, client, tls.and_then(channel_binding))
    };
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tasks.push(tokio::spawn(conn::serve(listener, Some(acceptor), api::router(app.clone()), opts.limits, peer, stop)));
    Ok(Running { addr, boot_addr, shutdown, tasks, app })
}

/// The connection's RFC 9266 tls-exporter value, as a CSR carries it (see [`proto::wire`]).
fn channel_binding(tls: &rustls::ServerConnection) -> Option<String> {
    let mut out = [0u8; proto::wire::CHANNEL_BINDING_LEN];
    tls.export_keying_material(&mut out, proto::wire::CHANNEL_BINDING_LABEL, None).ok()?;
    Some(proto::wire::channel_binding_text(&out))
}

fn subject_raw(der: &[u8]) -> Vec<u8> {
    x509_parser::parse_x509_certificate(der).map(|(_, c)| c.subject().as_raw().to_vec()).unwrap_or_default()
}

/// Who a client certificate (verified against the enrollment CA in the handshake) is: the
/// operator (`O=imgbuild:admins`, the state dir's admin identity) or a node (CN = its name).
fn classify(der: &[u8], enroll_subject: &[u8]) -> Option<Client> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if cert.issuer().as_raw() != enroll_subject {
        return None;
    }
    let admin = cert.subject().iter_organization().any(|o| o.as_str() == Ok(crate::pki::ADMIN_ORGANIZATION));
    if admin {
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        return Some(Client::Admin { name: cn });
    }
    Client::node(&cert)
}

/// TLS 1.3 only (the channel binding is the RFC 9266 exporter, defined for 1.3); client
/// certificates from the enrollment CA alone: nodes and the operator's admin identity. A
/// cluster-CA certificate (`system:masters` or not) is nobody here.
fn server_tls(state: &State, cas: &Cas) -> Result<rustls::ServerConfig> {
    use proto::tls::{certs_from_pem, key_from_pem, provider};
    let read =
        |p: std::path::PathBuf| std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()));
    let mut chain = certs_from_pem(&read(state.serve_cert())?, "serve certificate")?;
    // The CA goes with the chain: nodes find the pinned CA in it.
    chain.extend(certs_from_pem(&cas.cluster.cert_pem, "cluster CA")?);
    let key = key_from_pem(&read(state.serve_key())?, "serve key")?;
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(&cas.enrollment.cert_pem, "enrollment CA")? {
        roots.add(c)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .context("client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the serve certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Clients never resume (see proto::tls): tickets would be made, sent and stored for nothing.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}
