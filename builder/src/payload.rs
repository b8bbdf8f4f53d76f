//! First-boot payloads: what a machine needs to find and trust its enrollment server, for each
//! way payloads reach machines. Ignition (through the ignition-config crate), cloud-init,
//! VMware guestinfo, and iPXE scripts, all from one [`BootConfig`]. Deterministic: the same
//! state gives the same bytes, so operators can diff them. No private key is ever in one.
//!
//! What may be in one (docs/security.md): a node's payload carries that node's one-time
//! credential, a worker role's payload the worker token; both travel the operator's channels
//! (Ignition and cloud-init data, guestinfo). A master role's payload carries no credential:
//! a master proves itself with its own node payload or the operator's approval. What
//! `imgbuild serve` hands out to anyone (payloads over its open endpoints, iPXE scripts) is
//! [`open_config`]: the server and its pin, never a credential.

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use proto::Role;
use proto::bootcfg::{BOOT_CONFIG_VERSION, BootConfig, HostBasics, StaticNetwork};
use proto::paths;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::cluster::{Cluster, Node};
use crate::pki::CaKind;
use crate::pxe::PxeRoot;
use crate::state::{State, StateError};
use crate::templates;

/// The newest Ignition spec the ignition-config crate knows, and every one it accepts.
pub const IGNITION_VERSIONS: &[&str] = &["3.6.0", "3.5.0", "3.4.0", "3.3.0", "3.2.0", "3.1.0", "3.0.0"];

/// VMware guestinfo values larger than this do not travel reliably through VMX extraConfig.
pub const GUESTINFO_LIMIT: usize = 64 * 1024;

/// Why a payload cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// No valid role token for the role.
    #[error(
        "no valid enrollment token for role {0}: run `imgbuild init --rotate enrollment-tokens` or `imgbuild token create --usages enrollment --role {0}`"
    )]
    NoToken(Role),
    /// The node (named) has no valid one-time credential.
    #[error(
        "node {0} has no valid credential (spent, expired or revoked): `imgbuild nodes reset {0}` unbinds it and makes a new one"
    )]
    NoCredential(String),
    /// The manifest has no node of this name.
    #[error("no node '{0}' in the cluster manifest")]
    NoNode(String),
    /// The node has another role than the one asked for.
    #[error("node {node} is a {actual}, not a {wanted}")]
    WrongRole {
        /// The node.
        node: String,
        /// Its role.
        actual: Role,
        /// The role asked for.
        wanted: Role,
    },
    /// An Ignition spec version the ignition-config crate does not know.
    #[error("Ignition spec {0} is not supported (valid: {list})", list = IGNITION_VERSIONS.join(", "))]
    IgnitionVersion(String),
    /// A guestinfo value would be over the size limit.
    #[error(
        "{key} would be {size} bytes, over the {limit}-byte guestinfo limit: use --encoding gzip+base64, or deliver the payload by PXE"
    )]
    TooLarge {
        /// The guestinfo key.
        key: String,
        /// The encoded value's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The node (named) has no MAC for a per-MAC iPXE script.
    #[error("node {0} has no MAC address: a per-MAC iPXE script needs one")]
    NoMac(String),
    /// The state directory cannot be read (tokens, the CA).
    #[error(transparent)]
    State(#[from] StateError),
}

/// Who a payload is for.
pub struct Target<'a> {
    /// The role the machine is to have.
    pub role: Role,
    /// A single node: its static address rides along.
    pub node: Option<&'a Node>,
}

impl Target<'_> {
    fn describe(&self) -> String {
        match self.node {
            Some(n) => format!("{} node {}", self.role, n.name),
            None => format!("{} nodes", self.role),
        }
    }
}

/// The payload the operator hands to a machine: with the node's own credential for a node, the
/// worker token for workers, and no credential for a master role payload (approval).
pub fn boot_config(state: &State, cluster: &Cluster, target: &Target<'_>) -> Result<BootConfig, PayloadError> {
    let tokens = state.tokens()?;
    let now = OffsetDateTime::now_utc();
    let token = match (target.node, target.role) {
        (Some(n), _) => Some(
            tokens
                .node_credential(&n.name, now)
                .ok_or_else(|| PayloadError::NoCredential(n.name.clone()))?
                .token
                .clone(),
        ),
        (None, Role::Worker) => {
            Some(tokens.enrollment_token(Role::Worker, now).ok_or(PayloadError::NoToken(Role::Worker))?.token.clone())
        }
        (None, _) => None,
    };
    Ok(BootConfig { token, ..open_config(state, cluster, target)? })
}

/// What anyone may have: the servers, the CA pin, the role and a node's static address.
pub fn open_config(state: &State, cluster: &Cluster, target: &Target<'_>) -> Result<BootConfig, PayloadError> {
    Ok(BootConfig {
        version: BOOT_CONFIG_VERSION,
        servers: cluster.enrollment.servers.iter().map(ToString::to_string).collect(),
        ca_pin: state.ca(CaKind::Cluster)?.pin(),
        token: None,
        role: target.role,
        network: target.node.map(|n| StaticNetwork {
            interface: None,
            mac: n.mac.as_ref().map(ToString::to_string),
            address: n.address.to_string(),
            gateway: n.gateway.map(Into::into),
            dns: vec![],
        }),
        host: host_basics(cluster, target.node),
    })
}

/// `spec.hosts` for a payload, with `node`'s own SSH keys after the cluster's.
pub fn host_basics(cluster: &Cluster, node: Option<&Node>) -> HostBasics {
    let h = &cluster.hosts;
    HostBasics {
        dns_servers: h.dns_servers.clone(),
        search_domains: h.search_domains.clone(),
        ntp_servers: h.ntp_servers.clone(),
        ssh_authorized_keys: h
            .ssh_authorized_keys
            .iter()
            .chain(node.iter().flat_map(|n| &n.ssh_authorized_keys))
            .cloned()
            .collect(),
    }
}

/// The node `name`, checked to have `role`.
pub fn node<'a>(cluster: &'a Cluster, name: &str, role: Role) -> Result<&'a Node, PayloadError> {
    let n = cluster.node(name).ok_or_else(|| PayloadError::NoNode(name.into()))?;
    if n.role != role {
        return Err(PayloadError::WrongRole { node: name.into(), actual: n.role, wanted: role });
    }
    Ok(n)
}

/// The payload file, as firstboot reads it (compact JSON, one line).
#[expect(clippy::expect_used, reason = "a BootConfig is strings, numbers and addresses: JSON can hold all of them")]
pub fn config_json(cfg: &BootConfig) -> String {
    serde_json::to_string(cfg).expect("boot config serializes")
}

/// Removes `null` members: ignition-config serializes every unset optional field as null.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

macro_rules! ignition_for {
    // Spec 3.0 calls file contents FileContents; 3.1 and later, Resource.
    ($v:ident, $source:expr) => {
        ignition_for!($v, Resource, $source)
    };
    ($v:ident, $contents:ident, $source:expr) => {{
        use ignition_config::$v as ign;
        let mut c = ign::Config::default();
        let mut f = ign::File::new(paths::BOOT_CONFIG.to_string());
        f.mode = Some(0o600);
        f.overwrite = Some(true);
        f.contents = Some(ign::$contents { source: Some($source), ..Default::default() });
        c.storage = Some(ign::Storage { files: Some(vec![f]), ..Default::default() });
        let mut u = ign::Unit::new(paths::UNIT.to_string());
        u.enabled = Some(true);
        c.systemd = Some(ign::Systemd { units: Some(vec![u]) });
        serde_json::to_value(&c).expect("ignition config serializes")
    }};
}

/// An Ignition config that writes the payload (0600) and enables firstboot.
pub fn ignition(cfg: &BootConfig, version: &str) -> Result<String, PayloadError> {
    let source = format!("data:;base64,{}", B64.encode(config_json(cfg)));
    let mut v = match version {
        "3.6.0" => ignition_for!(v3_6, source),
        "3.5.0" => ignition_for!(v3_5, source),
        "3.4.0" => ignition_for!(v3_4, source),
        "3.3.0" => ignition_for!(v3_3, source),
        "3.2.0" => ignition_for!(v3_2, source),
        "3.1.0" => ignition_for!(v3_1, source),
        "3.0.0" => ignition_for!(v3_0, FileContents, source),
        other => return Err(PayloadError::IgnitionVersion(other.into())),
    };
    strip_nulls(&mut v);
    #[expect(clippy::expect_used, reason = "a serde_json::Value always serializes")]
    Ok(serde_json::to_string_pretty(&v).expect("json") + "\n")
}

/// A `#cloud-config` that writes the payload (0600) and starts firstboot.
#[expect(
    clippy::expect_used,
    reason = "an embedded template given every variable it uses; the payload tests render it"
)]
pub fn cloud_config(cfg: &BootConfig, cluster: &Cluster, target: &Target<'_>) -> String {
    templates::render(
        "cloud-config.yaml",
        json!({"what": target.describe(), "cluster": cluster.name, "path": paths::BOOT_CONFIG, "content": config_json(cfg), "unit": paths::UNIT}),
    )
    .expect("cloud-config template renders")
}

/// How a guestinfo value is encoded (its `.encoding` key says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Plain base64.
    Base64,
    /// gzip, then base64: for payloads near the size limit.
    GzipBase64,
}

impl Encoding {
    /// The name the `.encoding` key and `--encoding` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Base64 => "base64",
            Encoding::GzipBase64 => "gzip+base64",
        }
    }

    /// `data` encoded; the same input always gives the same text.
    #[expect(clippy::expect_used, reason = "gzip into a Vec<u8> cannot fail: writing to memory does not")]
    pub fn encode(self, data: &str) -> String {
        match self {
            Encoding::Base64 => B64.encode(data),
            Encoding::GzipBase64 => {
                // No file name, mtime 0: the same input gives the same bytes.
                let mut e = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
                e.write_all(data.as_bytes()).expect("writes to memory");
                B64.encode(e.finish().expect("writes to memory"))
            }
        }
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "base64" => Ok(Encoding::Base64),
            "gzip+base64" => Ok(Encoding::GzipBase64),
            _ => Err(format!("unknown encoding '{s}' (base64, gzip+base64)")),
        }
    }
}

/// The guestinfo keys for both payloads (the vApp properties the OVA declares), size-checked.
pub fn guestinfo(
    ignition: &str,
    cloud_config: &str,
    encoding: Encoding,
    limit: usize,
) -> Result<Vec<(String, String)>, PayloadError> {
    let mut out = Vec::new();
    for (key, data) in [("guestinfo.ignition.config.data", ignition), ("guestinfo.userdata", cloud_config)] {
        let value = encoding.encode(data);
        if value.len() > limit {
            return Err(PayloadError::TooLarge { key: key.into(), size: value.len(), limit });
        }
        out.push((key.to_string(), value));
        out.push((format!("{key}.encoding"), encoding.as_str().to_string()));
    }
    Ok(out)
}

/// guestinfo as `key=value` lines, and as a govc command for a VM named `vm`.
pub fn guestinfo_text(pairs: &[(String, String)], vm: &str) -> String {
    let mut s = String::from("# VMware guestinfo (extraConfig) keys; set them on a clone of the OVA's template:\n");
    for (k, v) in pairs {
        s.push_str(&format!("{k}={v}\n"));
    }
    s.push_str("\n# with govc:\n");
    s.push_str(&format!("govc vm.change -vm '{vm}'"));
    for (k, v) in pairs {
        s.push_str(&format!(" \\\n  -e '{k}={v}'"));
    }
    s.push('\n');
    s
}

/// Where a machine fetches its payload over HTTPS: a role's, or one node's.
pub fn payload_url(cluster: &Cluster, target: &Target<'_>) -> String {
    let server = cluster.enrollment.servers.first().map(ToString::to_string).unwrap_or_default();
    match target.node {
        Some(n) => format!("{server}{}", proto::wire::payload_node_path(&n.name)),
        None => format!("{server}{}", proto::wire::payload_role_path(target.role)),
    }
}

/// An iPXE script that boots the role's PXE set from `base` (its root as `root` says) and hands
/// the kernel the payload's location, the CA pin and the role's `spec.pxe.state`.
#[expect(
    clippy::expect_used,
    reason = "an embedded template given every variable it uses; the payload tests render it"
)]
pub fn ipxe(cfg: &BootConfig, cluster: &Cluster, target: &Target<'_>, base: &str, root: PxeRoot) -> String {
    let mut extra = String::new();
    if let Some(mac) = target.node.and_then(|n| n.mac.as_ref()) {
        extra.push_str(&format!(" firstboot.boot-mac={mac}"));
    }
    let initrds = crate::pxe::initrds(root);
    let initrd_args = initrds.iter().map(|f| format!("initrd={f}")).collect::<Vec<_>>().join(" ");
    templates::render(
        "payload.ipxe",
        json!({
            "what": target.describe(), "cluster": cluster.name, "base": base.trim_end_matches('/'),
            "cmdline": format!("{} {}", initrd_args, crate::pxe::cmdline(root, Some(cluster.pxe.state(target.role)))),
            "initrds": initrds, "payload_url": payload_url(cluster, target),
            "pin": cfg.ca_pin.to_string(), "extra": extra,
        }),
    )
    .expect("iPXE template renders")
}

/// The default base URL of the PXE sets served by `imgbuild serve --boot-listen`.
pub fn default_boot_base(cluster: &Cluster, role: Role) -> String {
    let host = cluster.enrollment.servers.first().map(|s| s.host.clone()).unwrap_or_else(|| "127.0.0.1".into());
    format!("http://{host}:8080/boot/{role}")
}
