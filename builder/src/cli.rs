//! Command-line interface: the parsed options of every subcommand. `main.rs` parses, sets up
//! logging and calls the matching function in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use proto::Role;

use crate::state::{DEFAULT_STATE_DIR, Rotate, STATE_ENV};
use crate::tokens::TokenUsage;

/// Bakes per-role node images for a Kubernetes cluster and serves their zero-touch enrollment.
///
/// The main job is `imgbuild --role ROLE`: bake a bootable image for that role.
#[derive(Debug, Parser)]
#[command(name = "imgbuild", version, max_term_width = 80)]
#[command(after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 invalid input (manifest, \
definition, token), 4 missing state or host tool, 5 fetch or checksum failure.")]
pub struct Cli {
    /// Options every subcommand takes.
    #[command(flatten)]
    pub global: Global,
    /// The bake's options, for `imgbuild --role ROLE` without a subcommand.
    #[command(flatten)]
    pub bake: BakeArgs,
    /// The subcommand; none bakes images.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options every subcommand takes: the state directory and the log level.
#[derive(Debug, Args)]
pub struct Global {
    /// Cluster state directory
    #[arg(long, global = true, env = STATE_ENV, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state: PathBuf,
    /// More log output (-v: debug, -vv: trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The main job: `imgbuild --role ROLE`.
#[derive(Debug, Args)]
pub struct BakeArgs {
    /// Bake the image of this role (repeatable): master, worker, etcd
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<Role>,
    /// The image definition and cache to bake from.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Output directory (images go to OUT/<role>/)
    #[arg(long, default_value = "out", value_name = "DIR")]
    pub out: PathBuf,
    /// The firstboot binary to install (default: the one next to this imgbuild)
    #[arg(long, value_name = "FILE")]
    pub firstboot: Option<PathBuf>,
    /// Rebuild the role's base tree and root file system even if the cache has them (a
    /// reproducibility check: the result must be byte-identical)
    #[arg(long)]
    pub fresh_tree: bool,
}

/// Which image definition, and where its inputs are cached.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Image definition (its lock is the .lock file beside it)
    #[arg(long, default_value = "images/ubuntu-24.04.toml", value_name = "FILE")]
    pub image: PathBuf,
    /// Use only the cache: no network at all (air-gapped sites)
    #[arg(long)]
    pub offline: bool,
    /// Cache of every input, by sha256 [default: /var/cache/imgbuild as root]
    #[arg(long, env = "IMGBUILD_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resolve an image definition into its lock: every package and component, by sha256
    Lock(LockArgs),
    /// Fill the cache with every input of an image, for offline builds
    Fetch(FetchArgs),
    /// Create or complete the cluster state: resolved spec, PKI, tokens
    Init(InitArgs),
    /// Check a cluster manifest and report every problem
    Validate(ValidateArgs),
    /// Create, list and revoke bootstrap and enrollment tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Emit a role's (or one node's) first-boot payload
    Payload(PayloadArgs),
    /// Run the enrollment server nodes talk to at first boot
    Serve(ServeArgs),
    /// Show every machine the enrollment server knows, or approve one
    Nodes(NodesArgs),
    /// Configuration for the network that PXE-boots the nodes
    #[command(subcommand)]
    Pxe(PxeCommand),
}

/// `imgbuild pxe`: what a site's PXE network needs.
#[derive(Debug, Subcommand)]
pub enum PxeCommand {
    /// A dnsmasq configuration: the inventory's DHCP leases, iPXE over TFTP for BIOS and UEFI
    /// firmware, and the chain to `imgbuild serve --boot-listen`
    Dnsmasq(DnsmasqArgs),
}

/// `imgbuild pxe dnsmasq`: options.
#[derive(Debug, Args)]
pub struct DnsmasqArgs {
    /// Where `imgbuild serve --boot-listen` is [default: http://<first server host>:8080/boot]
    #[arg(long, value_name = "URL")]
    pub boot_url: Option<String>,
    /// Serve DHCP and TFTP on this interface only
    #[arg(long, value_name = "NAME")]
    pub interface: Option<String>,
    /// Addresses for machines outside the inventory, FIRST,LAST (they then boot the worker
    /// script and wait for approval); without it they get no address
    #[arg(long, value_name = "FIRST,LAST")]
    pub dynamic_range: Option<String>,
    /// Where the iPXE binaries are (Debian's ipxe package)
    #[arg(long, default_value = crate::pxe::DEBIAN_IPXE_DIR, value_name = "DIR")]
    pub tftp_root: String,
    /// Ask the scripts for this root form (`?root=`) instead of the server's --boot-root
    #[arg(long, value_enum, value_name = "FORM")]
    pub root: Option<crate::pxe::PxeRoot>,
    /// Write here instead of stdout
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `imgbuild payload --format`: how the payload reaches the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadFormat {
    /// Ignition v3 config
    Ignition,
    /// cloud-init #cloud-config
    CloudInit,
    /// VMware guestinfo keys (both payloads) and a govc command
    Guestinfo,
    /// iPXE script booting the role's PXE set
    Ipxe,
    /// firstboot's own JSON (/etc/firstboot/config.json)
    Json,
}

/// `imgbuild payload`: options.
#[derive(Debug, Args)]
pub struct PayloadArgs {
    /// Role the payload is for
    #[arg(long)]
    pub role: Role,
    /// Output format
    #[arg(long, value_enum)]
    pub format: PayloadFormat,
    /// One node of the manifest: adds its static address (and MAC, for iPXE)
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Write here (0600) instead of stdout
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Ignition spec version (3.0.0 to 3.6.0)
    #[arg(long, default_value = "3.6.0", value_name = "VERSION")]
    pub ignition_version: String,
    /// guestinfo encoding: base64 or gzip+base64
    #[arg(long, default_value = "gzip+base64", value_name = "ENCODING")]
    pub encoding: String,
    /// iPXE: base URL of the role's PXE set [default: http://<first server host>:8080/boot/<role>]
    #[arg(long, value_name = "URL")]
    pub boot_url: Option<String>,
    /// For --format ipxe: how the kernel gets the root image
    #[arg(long, value_enum, default_value_t)]
    pub pxe_root: crate::pxe::PxeRoot,
}

/// `imgbuild serve`: options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on (HTTPS)
    #[arg(long, default_value = "0.0.0.0:9443", value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,
    /// Keep state in etcd instead of the state dir, so several servers can share it
    /// (comma-separated client URLs)
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) of the etcd members
    #[arg(long, value_name = "FILE", requires = "etcd_endpoints")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Also serve PXE sets and iPXE scripts over plain HTTP here (for PXE firmware)
    #[arg(long, value_name = "ADDR:PORT", requires = "boot_dir")]
    pub boot_listen: Option<std::net::SocketAddr>,
    /// Baked images to serve: DIR/<role>/pxe/ (the --out of the bakes)
    #[arg(long, value_name = "DIR")]
    pub boot_dir: Option<PathBuf>,
    /// How the iPXE scripts' kernels get the root image (a script's `?root=` overrides it)
    #[arg(long, value_enum, default_value_t, requires = "boot_dir")]
    pub boot_root: crate::pxe::PxeRoot,
    /// Connections open at once, per listener; more are closed as they come
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub header_timeout: u64,
    /// Seconds a request may take, its body included
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub request_timeout: u64,
    /// Seconds a connection may stay idle
    #[arg(long, default_value_t = 90, value_name = "SECONDS")]
    pub idle_timeout: u64,
    /// Refused enrollments one source address may have per minute before it is answered 429
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub failures_per_minute: u32,
}

/// `imgbuild nodes`: options, and the operation (none lists the machines).
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// What to do; none lists every machine.
    #[command(subcommand)]
    pub command: Option<NodesCommand>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// The enrollment server (default: the one running from this state dir)
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
}

/// `imgbuild nodes` operations.
#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Let a machine waiting for approval enroll, with the key its console shows
    Approve(ApproveArgs),
    /// Unbind a node so that a machine may enroll as it again (a replaced or reinstalled
    /// machine); an inventory node gets a new credential
    Reset(ResetArgs),
    /// Refuse a node's certificate from its next request on
    Revoke(RevokeArgs),
}

/// `imgbuild nodes approve`: options.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The machine: its identity key (uuid:... or macs:...), a MAC or its UUID
    pub machine: String,
    /// The key to approve (sha256:..., as the machine's console and `imgbuild nodes` show it);
    /// needed when the machine asked with more than one
    #[arg(long, value_name = "SHA256")]
    pub key: Option<String>,
    /// Node name for a machine outside the inventory (default: derived from its identity)
    #[arg(long)]
    pub name: Option<String>,
    /// Role for a machine outside the inventory (default: worker)
    #[arg(long)]
    pub role: Option<Role>,
}

/// `imgbuild nodes reset`: options.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The node to unbind
    pub node: String,
}

/// `imgbuild nodes revoke`: by node or by credential.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RevokeArgs {
    /// The node whose enrollment to revoke
    pub node: Option<String>,
    /// Revoke every node that enrolled with this credential (token id)
    #[arg(long, value_name = "ID")]
    pub token: Option<String>,
}

/// `imgbuild lock`: options.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The image definition to lock.
    #[command(flatten)]
    pub image: ImageArgs,
}

/// `imgbuild fetch`: options.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The image definition whose inputs to fetch.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Only this role's inputs (repeatable; default: every role)
    #[arg(long, value_name = "ROLE")]
    pub role: Vec<Role>,
}

/// `imgbuild init`: options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Cluster manifest (default: the embedded reference cluster)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Replace an existing CA, key, certificate or token set (repeatable): ca, etcd-ca,
    /// front-proxy-ca, enrollment-ca, sa, serve-cert, admin, join-token, enrollment-tokens
    #[arg(long, value_name = "WHAT")]
    pub rotate: Vec<Rotate>,
}

/// `imgbuild validate`: options.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Cluster manifest to check (default: the embedded reference cluster)
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub manifest: Option<PathBuf>,
}

/// `imgbuild token` operations.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it on stdout
    Create(TokenCreateArgs),
    /// List tokens (secrets are never shown)
    List(TokenListArgs),
    /// Revoke a token by its id
    Revoke(TokenRevokeArgs),
}

/// `imgbuild token create`: options.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// Lifetime, e.g. 24h, 7d; 0 for a token that never expires
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub ttl: String,
    /// Comma-separated usages: authentication, signing (Kubernetes join tokens) or enrollment
    #[arg(long, value_delimiter = ',', default_value = "authentication,signing")]
    pub usages: Vec<TokenUsage>,
    /// Extra groups for Kubernetes tokens (system:bootstrappers:...); comma-separated
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Enrollment tokens: the role machines enrolling with it get (a role token: worker only)
    #[arg(long)]
    pub role: Option<Role>,
    /// Enrollment tokens: a credential for this inventory node only (one machine, once)
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Enrollment tokens: how many machines may enroll with it
    #[arg(long, value_name = "N")]
    pub max_uses: Option<u32>,
    /// Free text shown by `token list`
    #[arg(long, default_value = "")]
    pub description: String,
}

/// `imgbuild token list`: options.
#[derive(Debug, Args)]
pub struct TokenListArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `imgbuild token revoke`: options.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id (its first six characters)
    pub id: String,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn help_fits_80_columns() {
        let mut cmd = super::Cli::command();
        let mut helps = vec![cmd.render_long_help().to_string()];
        for sub in cmd.get_subcommands_mut() {
            helps.push(sub.render_long_help().to_string());
            for subsub in sub.get_subcommands_mut() {
                helps.push(subsub.render_long_help().to_string());
            }
        }
        for h in helps {
            for line in h.lines() {
                assert!(line.chars().count() <= 80, "help line over 80 columns: {line:?}");
            }
        }
    }
}
