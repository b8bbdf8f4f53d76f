//! `imgbuild serve`: the HTTPS enrollment server (rustls, HTTP/1.1 and HTTP/2, graceful
//! shutdown). Nodes enroll with a token and then authenticate with the client certificate they
//! got; operators use `admin.conf`'s certificate for `imgbuild nodes`.
//!
//! Layers: [`api`] (HTTP) → [`fleet`] (enrollment logic) → [`store`] (durable state);
//! [`render`] makes each node's config.

pub mod api;
pub mod audit;
pub mod boot;
pub mod fleet;
pub mod metrics;
pub mod render;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use self::api::{App, Client, Peer};
use self::audit::Audit;
use self::fleet::{Cas, Fleet};
use self::render::Renderer;
use self::store::{EtcdConfig, EtcdStore, RedbStore, Store};
use crate::pki::CaKind;
use crate::state::State;

/// Where the server keeps its state.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `store/fleet.redb` in the state dir.
    Embedded,
    Etcd(EtcdConfig),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub backend: Backend,
    /// Write the audit log to `audit.log` in the state dir (off in benchmarks).
    pub audit_file: bool,
    /// Serve PXE sets and iPXE scripts over plain HTTP on this address, from this directory.
    pub boot: Option<(SocketAddr, std::path::PathBuf)>,
}

/// How long connections may take to finish after a shutdown request.
const DRAIN: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server that is listening.
pub struct Running {
    pub addr: SocketAddr,
    /// The plain-HTTP boot listener, when there is one.
    pub boot_addr: Option<SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pub app: Arc<App>,
}

impl Running {
    /// Stops accepting, lets open requests finish (up to 10 s), then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
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
    let (enroll_subject, cluster_subject) =
        (subject_raw(cas.enrollment.cert_der()), subject_raw(cas.cluster.cert_der()));
    let fleet = Fleet::new(store, cluster, cas, state.tokens_file(), audit);
    let app = Arc::new(App::new(fleet, renderer, state.clone()));
    let listener = TcpListener::bind(opts.listen).await.with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!("enrollment server on https://{addr} (store: {describe})");
    let (shutdown, mut stop) = tokio::sync::watch::channel(false);
    let boot_addr = match &opts.boot {
        None => None,
        Some((listen, dir)) => {
            let l = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            let a = l.local_addr()?;
            tracing::info!("PXE boot files on http://{a} from {}", dir.display());
            let router = boot::router(Arc::new(boot::BootFiles { app: app.clone(), dir: dir.clone() }));
            let mut stop = shutdown.subscribe();
            tokio::spawn(async move {
                let _ = axum::serve(l, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop.changed().await;
                    })
                    .await;
            });
            Some(a)
        }
    };
    let router = api::router(app.clone());
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let task = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, router) = (acceptor.clone(), router.clone());
            let (enroll_subject, cluster_subject) = (enroll_subject.clone(), cluster_subject.clone());
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake with {remote}: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| classify(c, &enroll_subject, &cluster_subject));
                let peer = Peer::new(remote, client);
                let svc = router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                });
                let svc = hyper_util::service::TowerToHyperService::new(svc);
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!("connection {remote}: {e}");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
            tracing::warn!("some connections did not finish within {DRAIN:?}");
        }
    });
    Ok(Running { addr, boot_addr, shutdown, task, app })
}

fn subject_raw(der: &[u8]) -> Vec<u8> {
    x509_parser::parse_x509_certificate(der).map(|(_, c)| c.subject().as_raw().to_vec()).unwrap_or_default()
}

/// Tells node certificates (enrollment CA) from admin ones (cluster CA, `system:masters`).
fn classify(der: &[u8], enroll_subject: &[u8], cluster_subject: &[u8]) -> Option<Client> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let issuer = cert.issuer().as_raw();
    if issuer == enroll_subject {
        return Client::node(&cert);
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let masters = cert.subject().iter_organization().any(|o| o.as_str() == Ok("system:masters"));
    (issuer == cluster_subject && masters).then_some(Client::Admin { name: cn })
}

fn server_tls(state: &State, cas: &Cas) -> Result<rustls::ServerConfig> {
    use proto::tls::{certs_from_pem, key_from_pem, provider};
    let read =
        |p: std::path::PathBuf| std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()));
    let mut chain = certs_from_pem(&read(state.serve_cert())?, "serve certificate")?;
    // The CA goes with the chain: nodes find the pinned CA in it.
    chain.extend(certs_from_pem(&cas.cluster.cert_pem, "cluster CA")?);
    let key = key_from_pem(&read(state.serve_key())?, "serve key")?;
    let mut roots = RootCertStore::empty();
    for ca in [&cas.enrollment, &cas.cluster] {
        for c in certs_from_pem(&ca.cert_pem, "client CA")? {
            roots.add(c)?;
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .context("client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the serve certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Clients never resume (see proto::tls): tickets would be made, sent and stored for nothing.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}
