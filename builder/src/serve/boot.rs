//! The PXE side of `imgbuild serve` (plain HTTP, as PXE firmware speaks it): each role's PXE set
//! from the bake output directory, and iPXE scripts that boot it with the first-boot payload's
//! location and the CA pin on the kernel command line, per role and per MAC. Point DHCP's boot
//! file at `http://SERVER:PORT/boot/mac/${mac}.ipxe` (or `/boot/ROLE.ipxe`); `?root=http` or
//! `?root=initrd` chooses how the kernel gets the root image, for that script.
//!
//! Everything here is for anyone on the network: no credential is ever in a script. A machine
//! booted this way fetches the open payload over HTTPS (pinned) and waits for the operator's
//! approval of its key (docs/security.md).

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use proto::Role;

use super::api::App;
use crate::payload::{self, Target};
use crate::pxe::PxeRoot;

/// `imgbuild serve --boot-listen ADDR --boot-dir DIR --boot-root FORM`.
#[derive(Debug, Clone)]
pub struct BootListen {
    /// Where the plain-HTTP listener binds.
    pub addr: std::net::SocketAddr,
    /// The bakes' output directory: `<role>/pxe/` under it.
    pub dir: PathBuf,
    /// The scripts' root form when they do not ask for one.
    pub root: PxeRoot,
}

/// What the boot listener serves from.
pub struct BootFiles {
    /// The enrollment server's state: the cluster and its CA pin, for the iPXE scripts.
    pub app: Arc<App>,
    /// The bakes' output directory: `<role>/pxe/` under it.
    pub dir: PathBuf,
    /// The scripts' root form when they do not ask for one.
    pub root: PxeRoot,
}

/// A script's query: `?root=initrd|http`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptQuery {
    root: Option<String>,
}

impl ScriptQuery {
    /// The asked-for root form, or the message of a 400 answer.
    fn root(&self, default: PxeRoot) -> Result<PxeRoot, String> {
        match self.root.as_deref() {
            None => Ok(default),
            Some(r) => <PxeRoot as clap::ValueEnum>::from_str(r, false)
                .map_err(|_| format!("root={r}: expected initrd or http\n")),
        }
    }
}

/// `/boot/<role>/<file>` (PXE set files; `rootfs.erofs.cpio` and `firstboot.erofs.cpio` wrapped
/// on the way), `/boot/mac/<mac>.ipxe` and `/boot/<role>.ipxe`.
pub fn router(files: Arc<BootFiles>) -> Router {
    Router::new()
        .route("/boot/{role}/{file}", get(file))
        .route("/boot/mac/{script}", get(by_mac))
        .route("/boot/{script}", get(by_role))
        .with_state(files)
}

fn not_found(what: String) -> Response {
    (StatusCode::NOT_FOUND, format!("{what}\n")).into_response()
}

async fn file(State(b): State<Arc<BootFiles>>, Path((role, name)): Path<(String, String)>) -> Response {
    // `rootfs.erofs.cpio`: the image wrapped in a cpio archive on the way out (pxe::initrds).
    let (file, wrap) = match name.strip_suffix(".cpio") {
        Some(image) if crate::pxe::initrds(PxeRoot::Initrd).contains(&name.as_str()) => (image, true),
        _ => (name.as_str(), false),
    };
    if role.parse::<Role>().is_err() || !crate::image::outputs::PXE_FILES.contains(&file) {
        return not_found(format!("no {role}/{name}"));
    }
    let path = b.dir.join(&role).join("pxe").join(file);
    let (f, size) = match tokio::fs::File::open(&path).await {
        Ok(f) => match f.metadata().await {
            Ok(m) => (f, m.len()),
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{}: {e}\n", path.display())).into_response(),
        },
        Err(_) => {
            return not_found(format!(
                "{} is not there: bake the {role} image into {}",
                path.display(),
                b.dir.display()
            ));
        }
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20);
    let (len, body) = if wrap {
        let Some(cpio) = crate::pxe::Newc::new(file, size) else {
            let msg = format!("{}: {size} bytes is more than a cpio archive holds (4 GiB)\n", path.display());
            return (StatusCode::INTERNAL_SERVER_ERROR, msg).into_response();
        };
        let len = cpio.archive_len();
        let part =
            |b: Vec<u8>| futures_util::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from(b)) });
        (len, Body::from_stream(part(cpio.head).chain(stream).chain(part(cpio.tail))))
    } else {
        (size, Body::from_stream(stream))
    };
    ([(header::CONTENT_LENGTH, len.to_string()), (header::CONTENT_TYPE, "application/octet-stream".into())], body)
        .into_response()
}

fn script(b: &BootFiles, headers: &HeaderMap, query: &ScriptQuery, target: Target<'_>) -> Response {
    let root = match query.root(b.root) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let base = format!("http://{host}/boot/{}", target.role);
    let cluster = b.app.fleet.cluster();
    match payload::open_config(&b.app.state, cluster, &target) {
        Ok(cfg) => {
            b.app.fleet.audit().line(
                "pxe-script",
                &[("role", target.role.as_str()), ("node", target.node.map_or("", |n| n.name.as_str()))],
            );
            ([(header::CONTENT_TYPE, "text/plain")], payload::ipxe(&cfg, cluster, &target, &base, root)).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn by_role(
    State(b): State<Arc<BootFiles>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<ScriptQuery>,
) -> Response {
    match name.strip_suffix(".ipxe").and_then(|r| r.parse::<Role>().ok()) {
        Some(role) => script(&b, &headers, &q, Target { role, node: None }),
        None => not_found(format!("no {name} (try master.ipxe, worker.ipxe)")),
    }
}

async fn by_mac(
    State(b): State<Arc<BootFiles>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<ScriptQuery>,
) -> Response {
    let mac = name.strip_suffix(".ipxe").unwrap_or(&name).to_ascii_lowercase().replace('-', ":");
    let node = b.app.fleet.cluster().nodes.iter().find(|n| n.mac.as_ref().is_some_and(|m| m.as_str() == mac));
    match node {
        Some(n) => script(&b, &headers, &q, Target { role: n.role, node: Some(n) }),
        None => not_found(format!("no node with MAC {mac} in the inventory")),
    }
}
