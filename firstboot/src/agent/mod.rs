//! The node side: first-boot phases, each idempotent and recorded in the phase record, so that
//! after a crash or power cut the next run resumes at the phase it was in.
//!
//! identify → enroll → fetch → write-files → host-setup → start-services → join → done.
//! Every phase is reported to the server (phases before enrollment once it has enrolled). After
//! success a boot only sends a short status report.

pub mod client;
pub mod host;
pub mod identity;
pub mod join;
pub mod record;
pub mod source;
pub mod systemd;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use time::OffsetDateTime;

use self::client::{Backoff, Client};
use self::host::Host;
use self::record::{Record, RecordFile};
use self::source::Found;
use self::systemd::Systemd;
use proto::bootcfg::BootConfig;
use proto::fsutil::{ensure_dir, write_atomic};
use proto::paths;
use proto::wire::*;

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// The tree to act on: `/` on a node, a directory in tests.
    pub root: PathBuf,
    /// A payload file that takes precedence over every other source.
    pub config: Option<PathBuf>,
    /// Give up (and fail) after this long; systemd restarts the unit later.
    pub deadline: Duration,
    /// `vmware-rpctool`, for the guestinfo source.
    pub rpctool: PathBuf,
    /// Run the join phase (off only for tests without a cluster).
    pub join: bool,
    pub backoff: Backoff,
    /// Test hook: abort the process (like a power cut) at this point.
    pub crash: Option<Crash>,
    /// Print each phase's outcome on stdout (the unit sends it to the console), for whoever
    /// watches the machine's console.
    pub console: bool,
}

impl Options {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Options {
            root: root.into(),
            config: None,
            deadline: Duration::from_secs(30 * 60),
            rpctool: "/usr/bin/vmware-rpctool".into(),
            join: true,
            backoff: Backoff::default(),
            crash: None,
            console: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("phase {phase} failed: {message}")]
    Phase { phase: Phase, message: String },
    #[error(transparent)]
    Record(#[from] record::RecordError),
}

/// Where the crash test hook strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// After the phase's work, before the record says it is done.
    Unrecorded(Phase),
    /// Right after the record says the phase is done.
    Recorded(Phase),
}

impl Crash {
    /// `FIRSTBOOT_CRASH=after:PHASE` or `FIRSTBOOT_CRASH=unrecorded:PHASE`.
    pub fn parse(s: &str) -> Option<Crash> {
        let (when, phase) = s.split_once(':')?;
        let phase: Phase = serde_json::from_value(serde_json::Value::String(phase.to_string())).ok()?;
        match when {
            "after" => Some(Crash::Recorded(phase)),
            "unrecorded" => Some(Crash::Unrecorded(phase)),
            _ => None,
        }
    }
}

fn crash_if(hook: Option<Crash>, at: Crash) {
    if hook == Some(at) {
        tracing::warn!("test hook: aborting at {at:?}");
        std::process::abort();
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This run finished provisioning.
    Provisioned { node: String, message: String },
    /// Provisioned on an earlier boot; only a status report was sent.
    AlreadyProvisioned { node: String, message: String },
}

pub struct Agent<H: Host, S: Systemd> {
    opts: Options,
    pub host: H,
    pub systemd: S,
    file: RecordFile,
    record: Record,
    deadline: Instant,
    boot_id: Option<String>,
    client: Option<Client>,
}

type PhaseResult = Result<String, String>;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Loads `path` if it holds a key, or makes a new ECDSA P-256 key and writes it there (0600)
/// before anything uses it, so that a rerun asks for a certificate for the same key.
fn key_at(path: &Path, owner: Option<(u32, u32)>) -> Result<KeyPair, String> {
    if let Ok(pem) = std::fs::read_to_string(path) {
        if let Ok(k) = KeyPair::from_pem(&pem) {
            return Ok(k);
        }
    }
    let key = KeyPair::generate().map_err(|e| format!("key generation: {e}"))?;
    ensure_dir(path.parent().expect("key path has a directory"), 0o755)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    write_atomic(path, key.serialize_pem().as_bytes(), 0o600, owner).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// A CSR with an empty subject: the server decides every name.
fn csr(key: &KeyPair) -> Result<String, String> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.serialize_request(key).and_then(|c| c.pem()).map_err(|e| format!("CSR: {e}"))
}

/// Resolves `user[:group]` against the tree's /etc/passwd and /etc/group.
fn resolve_owner(root: &Path, owner: Option<&str>) -> Result<Option<(u32, u32)>, String> {
    let Some(owner) = owner else { return Ok(None) };
    let (user, group) = owner.split_once(':').map_or((owner, None), |(u, g)| (u, Some(g)));
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        std::fs::read_to_string(paths::under(root, file)).ok()?.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.first() != Some(&name) {
                return None;
            }
            Some((f.get(2)?.parse().ok()?, f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0)))
        })
    };
    let (uid, primary) = lookup("/etc/passwd", user).ok_or_else(|| format!("no user {user} in /etc/passwd"))?;
    let gid = match group {
        None => primary,
        Some(g) => lookup("/etc/group", g).ok_or_else(|| format!("no group {g} in /etc/group"))?.0,
    };
    Ok(Some((uid, gid)))
}

impl<H: Host, S: Systemd> Agent<H, S> {
    pub fn new(opts: Options, host: H, systemd: S) -> Result<Self, AgentError> {
        let file = RecordFile::new(&opts.root);
        let record = file.load()?;
        let boot_id = std::fs::read_to_string(paths::under(&opts.root, "/proc/sys/kernel/random/boot_id"))
            .ok()
            .map(|s| s.trim().to_string());
        Ok(Agent { deadline: Instant::now() + opts.deadline, opts, host, systemd, file, record, boot_id, client: None })
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    fn boot_config(&self) -> &BootConfig {
        self.record.boot_config.as_ref().expect("identify phase stored the boot config")
    }

    /// This run's enrollment client (one connection pool for every phase), presenting the
    /// enrollment certificate once the record has one.
    fn client(&mut self) -> Result<Client, String> {
        if self.client.is_none() {
            let bc = self.boot_config();
            let mut c = Client::new(&bc.servers, bc.ca_pin, None, self.deadline).map_err(|e| e.to_string())?;
            c.backoff = self.opts.backoff.clone();
            self.client = Some(c);
        }
        let c = self.client.clone().expect("just made");
        if let Some(cert) = self.record.client_cert.as_deref().filter(|_| !c.presents_certificate()) {
            let key = std::fs::read_to_string(self.file.dir().join("enroll.key"))
                .map_err(|e| format!("enrollment key: {e}"))?;
            c.present(cert, &key).map_err(|e| e.to_string())?;
        }
        Ok(c)
    }

    fn report(&mut self, phase: Phase, status: PhaseStatus, message: &str, started_at: OffsetDateTime) {
        if self.opts.console {
            println!("firstboot: {phase}: {}: {message}", status.as_str());
        }
        let r = Report {
            phase,
            status,
            message: message.to_string(),
            started_at,
            at: now(),
            boot_id: self.boot_id.clone(),
        };
        self.record.pending_reports.push(r);
    }

    /// Delivers queued reports if enrolled; keeps what could not be delivered.
    async fn flush_reports(&mut self) {
        if self.record.client_cert.is_none() || self.record.pending_reports.is_empty() {
            return;
        }
        let Ok(client) = self.client() else { return };
        while let Some(r) = self.record.pending_reports.first().cloned() {
            match client.post::<_, serde_json::Value>(PATH_REPORT, &r).await {
                Ok(_) => {
                    self.record.pending_reports.remove(0);
                }
                Err(e) => {
                    tracing::warn!("report {} {}: {e}", r.phase, r.status.as_str());
                    break;
                }
            }
        }
    }

    /// Runs every phase from where the record says, then reports and returns the outcome.
    pub async fn run(&mut self) -> Result<Outcome, AgentError> {
        self.record.boots += 1;
        self.file.save(&self.record)?;
        if self.record.phase == Phase::Done && self.record.finished_at.is_some() {
            let node = self.record.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
            let message = format!("already provisioned ({}); boot {}", self.record.outcome, self.record.boots);
            self.report(Phase::Done, PhaseStatus::Succeeded, &message, now());
            self.flush_reports().await;
            self.file.save(&self.record)?;
            return Ok(Outcome::AlreadyProvisioned { node, message });
        }
        loop {
            let phase = self.record.phase;
            let started = now();
            tracing::info!("phase {phase}: starting");
            let result = self.phase(phase).await;
            match result {
                Ok(message) => {
                    crash_if(self.opts.crash, Crash::Unrecorded(phase));
                    tracing::info!("phase {phase}: {message}");
                    self.report(phase, PhaseStatus::Succeeded, &message, started);
                    if phase == Phase::Done {
                        self.record.finished_at = Some(now());
                        self.record.outcome = message.clone();
                        self.file.save(&self.record)?;
                        self.flush_reports().await;
                        self.file.save(&self.record)?;
                        let node = self.record.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
                        return Ok(Outcome::Provisioned { node, message });
                    }
                    self.record.phase = phase.next().expect("only done has no next phase");
                    self.file.save(&self.record)?;
                    crash_if(self.opts.crash, Crash::Recorded(phase));
                    self.flush_reports().await;
                    self.file.save(&self.record)?;
                }
                Err(message) => {
                    tracing::error!("phase {phase} failed: {message}");
                    self.report(phase, PhaseStatus::Failed, &message, started);
                    self.file.save(&self.record)?;
                    self.flush_reports().await;
                    self.file.save(&self.record)?;
                    return Err(AgentError::Phase { phase, message });
                }
            }
        }
    }

    async fn phase(&mut self, phase: Phase) -> PhaseResult {
        match phase {
            Phase::Identify => self.identify().await,
            Phase::Enroll => self.enroll().await,
            Phase::Fetch => self.fetch().await,
            Phase::WriteFiles => self.write_files(),
            Phase::HostSetup => self.host_setup(),
            Phase::StartServices => self.start_services().await,
            Phase::Join => self.join().await,
            Phase::Done => Ok(self.record.outcome_message()),
        }
    }

    async fn identify(&mut self) -> PhaseResult {
        let root = self.opts.root.clone();
        let identity = identity::identify(&root, &identity::default_sources());
        if identity.is_empty() {
            return Err("no machine identity: no SMBIOS UUID and no Ethernet MAC address".into());
        }
        let sources = source::default_sources(self.opts.config.clone(), self.opts.rpctool.clone());
        let (found, from) = source::load(&root, &sources).map_err(|e| e.to_string())?.ok_or_else(|| {
            let names: Vec<String> = sources.iter().map(|s| s.name()).collect();
            format!("no first-boot payload (looked at: {})", names.join(", "))
        })?;
        let config = match found {
            Found::Config(c) => c,
            Found::Remote { url, pin } => fetch_remote(&url, pin).await?,
        };
        let image = std::fs::read(paths::under(&root, paths::IMAGE_INFO))
            .ok()
            .and_then(|b| serde_json::from_slice::<ImageInfo>(&b).ok());
        if let Some(i) = &image {
            if i.role != config.role {
                return Err(format!("this is a {} image but the payload is for role {}", i.role, config.role));
            }
        }
        if let Some(net) = &config.network {
            self.static_network(net).await?;
        }
        let message = format!(
            "machine {} ({} MACs), payload from {from}, servers {}; {}",
            identity.key(),
            identity.macs.len(),
            config.servers.join(","),
            host::root_layout(&root)
        );
        self.record.identity = Some(identity);
        self.record.boot_config = Some(config);
        self.record.image = image;
        Ok(message)
    }

    /// A static address from the payload, for networks without DHCP: a systemd-networkd file for
    /// the NIC (by MAC, or name), applied before enrolling.
    async fn static_network(&mut self, net: &proto::bootcfg::StaticNetwork) -> Result<(), String> {
        let matcher = match (&net.mac, &net.interface) {
            (Some(mac), _) => format!("MACAddress={mac}"),
            (None, Some(name)) => format!("Name={name}"),
            (None, None) => "Type=ether\nKind=!veth !bridge".to_string(),
        };
        let mut unit = format!(
            "# Written by firstboot from the first-boot payload.\n[Match]\n{matcher}\n\n[Network]\nAddress={}\n",
            net.address
        );
        if let Some(gw) = net.gateway {
            unit.push_str(&format!("Gateway={gw}\n"));
        }
        for d in &net.dns {
            unit.push_str(&format!("DNS={d}\n"));
        }
        let path = paths::under(&self.opts.root, paths::STATIC_NETWORK);
        ensure_dir(path.parent().expect("has parent"), 0o755).map_err(|e| format!("{}: {e}", path.display()))?;
        write_atomic(&path, unit.as_bytes(), 0o644, None).map_err(|e| format!("{}: {e}", path.display()))?;
        self.systemd.restart("systemd-networkd.service").await.map_err(|e| e.to_string())
    }

    async fn enroll(&mut self) -> PhaseResult {
        let key = key_at(&self.file.dir().join("enroll.key"), None)?;
        let req = EnrollRequest {
            protocol: PROTOCOL_VERSION,
            token: self.boot_config().token.clone(),
            identity: self.record.identity.clone().expect("identified"),
            image: self.record.image.clone(),
            csr: csr(&key)?,
        };
        let client = self.client()?;
        loop {
            let resp: EnrollResponse = client.post(PATH_ENROLL, &req).await.map_err(|e| e.to_string())?;
            match resp.status {
                EnrollStatus::Enrolled => {
                    let node = resp.node.ok_or("server said enrolled without a node")?;
                    let cert = resp.client_cert.ok_or("server said enrolled without a certificate")?;
                    // This connection is the node's now; new ones show the certificate.
                    client.present(&cert, &key.serialize_pem()).map_err(|e| e.to_string())?;
                    self.record.client_cert = Some(cert);
                    let msg = format!("enrolled as {} node {}", node.role, node.name);
                    self.record.node = Some(node);
                    return Ok(msg);
                }
                EnrollStatus::Pending => {
                    let wait = Duration::from_secs(resp.retry_after_secs.unwrap_or(30).into());
                    if Instant::now() + wait > self.deadline {
                        return Err(format!("still waiting for approval at the deadline: {}", resp.message));
                    }
                    tracing::info!("{}; asking again in {}s", resp.message, wait.as_secs());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn fetch(&mut self) -> PhaseResult {
        let client = self.client()?;
        let config: NodeConfig = client.get(PATH_CONFIG).await.map_err(|e| e.to_string())?;
        let mut csrs = Vec::new();
        for c in &config.certs {
            let owner = resolve_owner(&self.opts.root, c.owner.as_deref())?;
            let key = key_at(&paths::under(&self.opts.root, &c.key_path), owner)?;
            csrs.push(CsrRequest { purpose: c.purpose, csr: csr(&key)? });
        }
        let certs = if csrs.is_empty() {
            Vec::new()
        } else {
            client.post::<_, SignResponse>(PATH_SIGN, &SignRequest { csrs }).await.map_err(|e| e.to_string())?.certs
        };
        let msg =
            format!("{} files, {} units, {} certificates signed", config.files.len(), config.units.len(), certs.len());
        self.record.config = Some(config);
        self.record.certs = certs;
        Ok(msg)
    }

    fn write_files(&mut self) -> PhaseResult {
        let config = self.record.config.as_ref().expect("fetched");
        let root = &self.opts.root;
        let mut n = 0;
        let cert_files = config.certs.iter().filter_map(|spec| {
            let issued = self.record.certs.iter().find(|c| c.purpose == spec.purpose)?;
            Some(FileSpec {
                path: spec.cert_path.clone(),
                mode: 0o644,
                owner: spec.owner.clone(),
                contents: issued.cert.clone(),
                expand: false,
            })
        });
        // Only the node knows what its NIC is called.
        let interface = if config.files.iter().any(|f| f.expand) {
            Some(identity::node_interface(root, &config.host).ok_or_else(|| {
                format!(
                    "no network interface with MAC {} or address {}",
                    config.host.interface_mac.as_deref().unwrap_or("-"),
                    config.host.interface_address.as_deref().unwrap_or("-")
                )
            })?)
        } else {
            None
        };
        for f in config.files.iter().cloned().chain(cert_files) {
            if !f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
                return Err(format!("refusing to write {}: not an absolute path without '..'", f.path));
            }
            let path = paths::under(root, &f.path);
            let owner = resolve_owner(root, f.owner.as_deref())?;
            ensure_dir(path.parent().expect("absolute path has a parent"), 0o755)
                .map_err(|e| format!("{}: {e}", f.path))?;
            let contents = match (&interface, f.expand) {
                (Some(name), true) => f.contents.replace(INTERFACE_PLACEHOLDER, name),
                _ => f.contents,
            };
            write_atomic(&path, contents.as_bytes(), f.mode, owner).map_err(|e| format!("{}: {e}", f.path))?;
            n += 1;
        }
        Ok(match interface {
            Some(name) => format!("wrote {n} files (interface {name})"),
            None => format!("wrote {n} files"),
        })
    }

    fn host_setup(&mut self) -> PhaseResult {
        let host = self.record.config.as_ref().expect("fetched").host.clone();
        self.host.set_hostname(&host.hostname).map_err(|e| e.to_string())?;
        for m in &host.modules {
            self.host.load_module(m).map_err(|e| e.to_string())?;
        }
        for (k, v) in &host.sysctls {
            self.host.sysctl(k, v).map_err(|e| e.to_string())?;
        }
        if host.swap_off {
            self.host.swap_off().map_err(|e| e.to_string())?;
        }
        for d in &host.data_disks {
            self.host.mount_data_disk(d).map_err(|e| e.to_string())?;
        }
        Ok(format!(
            "hostname {}, {} modules, {} sysctls{}",
            host.hostname,
            host.modules.len(),
            host.sysctls.len(),
            if host.swap_off { ", swap off" } else { "" }
        ))
    }

    async fn start_services(&mut self) -> PhaseResult {
        let units = self.record.config.as_ref().expect("fetched").units.clone();
        self.systemd.daemon_reload().await.map_err(|e| e.to_string())?;
        let enable: Vec<String> = units.iter().filter(|u| u.enable).map(|u| u.name.clone()).collect();
        self.systemd.enable(&enable).await.map_err(|e| e.to_string())?;
        let mut started = Vec::new();
        for u in units.iter().filter(|u| u.start) {
            if u.restart { self.systemd.restart(&u.name).await } else { self.systemd.start(&u.name).await }
                .map_err(|e| e.to_string())?;
            started.push(u.name.as_str());
        }
        Ok(if started.is_empty() { "no units to start".into() } else { format!("started {}", started.join(", ")) })
    }

    async fn join(&mut self) -> PhaseResult {
        let Some(spec) = self.record.config.as_ref().expect("fetched").join.clone() else {
            self.record.outcome = "provisioned".into();
            return Ok("no join for this role".into());
        };
        if !self.opts.join {
            self.record.outcome = "provisioned (join skipped)".into();
            return Ok("skipped (--no-join)".into());
        }
        let client = self.client()?;
        let msg = join::join(&spec, &self.opts.root, &mut self.systemd, &client, self.deadline)
            .await
            .map_err(|e| e.to_string())?;
        self.record.outcome = msg.clone();
        Ok(msg)
    }
}

impl Record {
    fn outcome_message(&self) -> String {
        let node = self.node.as_ref().map_or(String::new(), |n| format!("{} node {}: ", n.role, n.name));
        format!("{node}{}", if self.outcome.is_empty() { "provisioned" } else { &self.outcome })
    }
}

/// Fetches a payload named on the kernel command line; HTTPS is trusted only under `pin`.
async fn fetch_remote(url: &str, pin: proto::pin::CaPin) -> Result<BootConfig, String> {
    let tls = proto::tls::pinned_client_config(pin, Default::default()).map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let mut attempt = 0;
    let backoff = Backoff::default();
    loop {
        let r = http.get(url).send().await;
        match r {
            Ok(r) if r.status().is_success() => {
                let text = r.text().await.map_err(|e| format!("{url}: {e}"))?;
                return source::parse_payload(&text, url).map_err(|e| e.to_string());
            }
            Ok(r) if r.status().is_client_error() => return Err(format!("{url}: HTTP {}", r.status())),
            other => {
                let why = match other {
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => client::error_chain(&e),
                };
                if attempt >= 8 {
                    return Err(format!("{url}: {why}"));
                }
                tracing::warn!("{url}: {why}; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
        }
    }
}
