//! The node side: first-boot phases, each idempotent and recorded in the phase record, so that
//! after a crash or power cut the next run resumes at the phase it was in.
//!
//! identify → enroll → fetch → write-files → host-setup → start-services → join → done.
//! Every phase is reported to the server (phases before enrollment once it has enrolled). After
//! success a boot only sends a short status report.

pub mod client;
pub mod error;
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
use self::error::{IoAt, PhaseError, call};
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
    /// open-vm-tools' `vmtoolsd`, for the guestinfo source.
    pub vmtoolsd: PathBuf,
    /// Run the join phase (off only for tests without a cluster).
    pub join: bool,
    /// How calls of the enrollment server are retried.
    pub backoff: Backoff,
    /// Test hook: abort the process (like a power cut) at this point.
    pub crash: Option<Crash>,
    /// Print each phase's outcome on stdout (the unit sends it to the console), for whoever
    /// watches the machine's console.
    pub console: bool,
}

impl Options {
    /// The defaults a node runs with (30-minute deadline, join on), acting on the tree at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Options {
            root: root.into(),
            config: None,
            deadline: Duration::from_secs(30 * 60),
            vmtoolsd: source::VMTOOLSD.into(),
            join: true,
            backoff: Backoff::default(),
            crash: None,
            console: false,
        }
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A phase failed; the record stays at that phase for the next run.
    #[error("phase {phase} failed: {}", error.chain())]
    Phase {
        /// The phase that failed.
        phase: Phase,
        /// Why it failed.
        error: PhaseError,
    },
    /// The phase record could not be read or written.
    #[error(transparent)]
    Record(#[from] record::RecordError),
    /// Connecting to systemd failed.
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
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
    Provisioned {
        /// The node's name.
        node: String,
        /// The last phase's outcome ("joined", "control plane ready").
        message: String,
    },
    /// Provisioned on an earlier boot; only a status report was sent.
    AlreadyProvisioned {
        /// The node's name.
        node: String,
        /// What the status report said.
        message: String,
    },
}

/// One run of firstboot over a tree: its phase record, its host and systemd (real or recorded).
pub struct Agent<H: Host, S: Systemd> {
    opts: Options,
    /// What changes the host: the real one, or a [`host::Recorder`] in tests.
    pub host: H,
    /// How units are managed: D-Bus, or a recorder in tests.
    pub systemd: S,
    file: RecordFile,
    record: Record,
    deadline: Instant,
    boot_id: Option<String>,
    client: Option<Client>,
}

/// What a phase did, for its report.
type PhaseResult = Result<String, PhaseError>;

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Loads `path` if it holds a key, or makes a new ECDSA P-256 key and writes it there (0600)
/// before anything uses it, so that a rerun asks for a certificate for the same key.
fn key_at(path: &Path, owner: Option<(u32, u32)>) -> Result<KeyPair, PhaseError> {
    if let Ok(pem) = std::fs::read_to_string(path) {
        if let Ok(k) = KeyPair::from_pem(&pem) {
            return Ok(k);
        }
    }
    let key = KeyPair::generate()?;
    if let Some(dir) = path.parent() {
        ensure_dir(dir, 0o755).at(dir)?;
    }
    write_atomic(path, key.serialize_pem().as_bytes(), 0o600, owner).at(path)?;
    Ok(key)
}

/// The PKCS#9 challengePassword attribute (RFC 2985), where an enrollment CSR carries the
/// channel binding of the connection it is sent on (see [`proto::wire`]).
fn binding_attribute(binding: &str) -> rcgen::Attribute {
    const OID_CHALLENGE_PASSWORD: &[u64] = &[1, 2, 840, 113549, 1, 9, 7];
    // SET OF { UTF8String binding }: base64 of 32 bytes, so one-byte DER lengths.
    let mut values = vec![0x31, (binding.len() + 2) as u8, 0x0c, binding.len() as u8];
    values.extend_from_slice(binding.as_bytes());
    rcgen::Attribute { oid: OID_CHALLENGE_PASSWORD, values }
}

/// A CSR with an empty subject (the server decides every name); bound to a connection when
/// `binding` is given.
pub fn csr(key: &KeyPair, binding: Option<&str>) -> Result<String, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let attrs = binding.map(|b| vec![binding_attribute(b)]).unwrap_or_default();
    p.serialize_request_with_attributes(key, attrs)?.pem()
}

/// `sha256:` of a key's SubjectPublicKeyInfo, as `imgbuild nodes` shows it.
pub fn key_fingerprint(key: &KeyPair) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, &rcgen::PublicKeyData::subject_public_key_info(key));
    format!("sha256:{}", d.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Resolves `user[:group]` against the tree's /etc/passwd and /etc/group.
fn resolve_owner(root: &Path, owner: Option<&str>) -> Result<Option<(u32, u32)>, PhaseError> {
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
    let (uid, primary) =
        lookup("/etc/passwd", user).ok_or_else(|| PhaseError::Owner(format!("no user {user} in /etc/passwd")))?;
    let gid = match group {
        None => primary,
        Some(g) => lookup("/etc/group", g).ok_or_else(|| PhaseError::Owner(format!("no group {g} in /etc/group")))?.0,
    };
    Ok(Some((uid, gid)))
}

impl<H: Host, S: Systemd> Agent<H, S> {
    /// An agent over `opts.root`, with its phase record loaded (a new one on first boot).
    pub fn new(opts: Options, host: H, systemd: S) -> Result<Self, AgentError> {
        let file = RecordFile::new(&opts.root);
        let record = file.load()?;
        let boot_id = std::fs::read_to_string(paths::under(&opts.root, "/proc/sys/kernel/random/boot_id"))
            .ok()
            .map(|s| s.trim().to_string());
        Ok(Agent { deadline: Instant::now() + opts.deadline, opts, host, systemd, file, record, boot_id, client: None })
    }

    /// The phase record as it stands.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// This run's enrollment client (one connection for every phase), presenting the
    /// enrollment certificate once the record has one.
    fn client(&mut self) -> Result<Client, PhaseError> {
        let c = match &self.client {
            Some(c) => c.clone(),
            None => {
                let bc = self.record.need(&self.record.boot_config, "payload")?;
                let mut c = Client::new(&bc.servers, bc.ca_pin, None, self.deadline)?;
                c.backoff = self.opts.backoff.clone();
                self.client = Some(c.clone());
                c
            }
        };
        if let Some(cert) = self.record.client_cert.as_deref().filter(|_| !c.presents_certificate()) {
            let path = self.file.dir().join("enroll.key");
            let key = std::fs::read_to_string(&path).at(&path)?;
            c.present(cert, &key)?;
        }
        Ok(c)
    }

    fn report(
        &mut self,
        phase: Phase,
        status: PhaseStatus,
        message: &str,
        code: Option<&str>,
        started_at: OffsetDateTime,
    ) {
        if self.opts.console {
            println!("firstboot: {phase}: {}: {message}", status.as_str());
        }
        // A report's message is bounded; the journal has the whole of it.
        let mut message = message.to_string();
        if message.len() > limits::REPORT_MESSAGE {
            let mut cut = limits::REPORT_MESSAGE - 3;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        let r = Report {
            phase,
            status,
            message,
            code: code.map(str::to_string),
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
            self.report(Phase::Done, PhaseStatus::Succeeded, &message, None, now());
            self.flush_reports().await;
            self.file.save(&self.record)?;
            return Ok(Outcome::AlreadyProvisioned { node, message });
        }
        loop {
            let phase = self.record.phase;
            let started = now();
            tracing::info!("phase {phase}: starting");
            match self.phase(phase).await {
                Ok(message) => {
                    crash_if(self.opts.crash, Crash::Unrecorded(phase));
                    tracing::info!("phase {phase}: {message}");
                    self.report(phase, PhaseStatus::Succeeded, &message, None, started);
                    let Some(next) = phase.next() else {
                        self.record.finished_at = Some(now());
                        self.record.outcome = message.clone();
                        self.file.save(&self.record)?;
                        self.flush_reports().await;
                        self.file.save(&self.record)?;
                        let node = self.record.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
                        return Ok(Outcome::Provisioned { node, message });
                    };
                    self.record.phase = next;
                    self.file.save(&self.record)?;
                    crash_if(self.opts.crash, Crash::Recorded(phase));
                    self.flush_reports().await;
                    self.file.save(&self.record)?;
                }
                Err(error) => {
                    let message = error.chain();
                    tracing::error!("phase {phase} failed: {message}");
                    self.report(phase, PhaseStatus::Failed, &message, Some(error.code()), started);
                    self.file.save(&self.record)?;
                    self.flush_reports().await;
                    self.file.save(&self.record)?;
                    return Err(AgentError::Phase { phase, error });
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
        let identity = identity.normalized().map_err(|_| PhaseError::NoIdentity)?;
        let sources = source::default_sources(self.opts.config.clone(), self.opts.vmtoolsd.clone());
        let (found, from) = source::load(&root, &sources)?
            .ok_or_else(|| PhaseError::NoPayload(sources.iter().map(|s| s.name()).collect()))?;
        let config = match found {
            Found::Config(c) => *c,
            Found::Remote { url, pin } => fetch_remote(&url, pin, &self.opts.backoff, self.deadline).await?,
        };
        let image = std::fs::read(paths::under(&root, paths::IMAGE_INFO))
            .ok()
            .and_then(|b| serde_json::from_slice::<ImageInfo>(&b).ok());
        if let Some(i) = &image {
            if i.role != config.role {
                return Err(PhaseError::RoleMismatch { image: i.role, payload: config.role });
            }
        }
        if config.role != proto::Role::Worker {
            if let Some(fstype) = host::state_in_ram(&root) {
                return Err(PhaseError::StateInRam { role: config.role, fstype });
            }
        }
        if let Some(net) = &config.network {
            self.static_network(net).await?;
        }
        self.host_basics(&config.host).await?;
        let message = format!(
            "machine {} ({} MACs), payload from {from} ({}), servers {}; {}",
            identity.key(),
            identity.macs.len(),
            if config.token.is_some() { "with a credential" } else { "no credential: approval" },
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
    async fn static_network(&mut self, net: &proto::bootcfg::StaticNetwork) -> Result<(), PhaseError> {
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
        if let Some(dir) = path.parent() {
            ensure_dir(dir, 0o755).at(dir)?;
        }
        write_atomic(&path, unit.as_bytes(), 0o644, None).at(&path)?;
        Ok(self.systemd.restart("systemd-networkd.service").await?)
    }

    /// The payload's DNS servers and search domains (a systemd-resolved drop-in), NTP servers (a
    /// systemd-timesyncd drop-in) and operators' SSH keys (root's `authorized_keys`): applied
    /// before enrolling, so that an operator can log in even on a machine that gets no further.
    async fn host_basics(&mut self, h: &proto::bootcfg::HostBasics) -> Result<(), PhaseError> {
        let root = self.opts.root.clone();
        let write = |node_path: &str, dir_mode: u32, mode: u32, text: String| -> Result<(), PhaseError> {
            let path = paths::under(&root, node_path);
            if let Some(dir) = path.parent() {
                ensure_dir(dir, dir_mode).at(dir)?;
            }
            write_atomic(&path, text.as_bytes(), mode, None).at(&path)?;
            Ok(())
        };
        const HEADER: &str = "# Written by firstboot from the first-boot payload (spec.hosts).\n";
        if !h.dns_servers.is_empty() || !h.search_domains.is_empty() {
            let mut text = format!("{HEADER}[Resolve]\n");
            if !h.dns_servers.is_empty() {
                let servers: Vec<String> = h.dns_servers.iter().map(ToString::to_string).collect();
                text += &format!("DNS={}\n", servers.join(" "));
            }
            if !h.search_domains.is_empty() {
                text += &format!("Domains={}\n", h.search_domains.join(" "));
            }
            write(paths::RESOLVED_DROPIN, 0o755, 0o644, text)?;
            self.systemd.restart("systemd-resolved.service").await?;
        }
        if !h.ntp_servers.is_empty() {
            write(paths::TIMESYNCD_DROPIN, 0o755, 0o644, format!("{HEADER}[Time]\nNTP={}\n", h.ntp_servers.join(" ")))?;
            self.systemd.restart("systemd-timesyncd.service").await?;
        }
        if !h.ssh_authorized_keys.is_empty() {
            let keys: String = h.ssh_authorized_keys.iter().map(|k| format!("{k}\n")).collect();
            write(paths::ROOT_AUTHORIZED_KEYS, 0o700, 0o600, format!("{HEADER}{keys}"))?;
        }
        Ok(())
    }

    /// Enrolls with the payload's credential, or without one, waiting for the operator's
    /// approval of this key (its fingerprint goes to the console, for the operator to compare).
    async fn enroll(&mut self) -> PhaseResult {
        let key = key_at(&self.file.dir().join("enroll.key"), None)?;
        let fingerprint = key_fingerprint(&key);
        let token = self.record.need(&self.record.boot_config, "payload")?.token.clone();
        let identity = self.record.need(&self.record.identity, "machine identity")?.clone();
        let image = self.record.image.clone();
        let client = self.client()?;
        let mut announced = false;
        loop {
            // The CSR is made for the connection it goes on: worthless on any other.
            let resp: EnrollResponse = client
                .post_bound(PATH_ENROLL, |binding| {
                    Ok(EnrollRequest {
                        protocol: PROTOCOL_VERSION,
                        token: token.clone(),
                        identity: identity.clone(),
                        image: image.clone(),
                        csr: csr(&key, Some(binding)).map_err(|e| e.to_string())?,
                    })
                })
                .await
                .map_err(call("enrolling"))?;
            match resp.status {
                EnrollStatus::Enrolled => {
                    let node = resp.node.ok_or(PhaseError::Incomplete("enrolled", "node"))?;
                    let cert = resp.client_cert.ok_or(PhaseError::Incomplete("enrolled", "certificate"))?;
                    // This connection is the node's now; new ones show the certificate.
                    client.present(&cert, &key.serialize_pem())?;
                    self.record.client_cert = Some(cert);
                    let msg = format!("enrolled as {} node {} (key {fingerprint})", node.role, node.name);
                    self.record.node = Some(node);
                    return Ok(msg);
                }
                EnrollStatus::Pending => {
                    let wait = Duration::from_secs(resp.retry_after_secs.unwrap_or(30).into());
                    if Instant::now() + wait > self.deadline {
                        return Err(PhaseError::NotApproved(resp.message));
                    }
                    if !announced && self.opts.console {
                        // The operator compares this with `imgbuild nodes` before approving.
                        println!("firstboot: enroll: waiting for approval of this machine's key {fingerprint}");
                        announced = true;
                    }
                    tracing::info!("{}; asking again in {}s", resp.message, wait.as_secs());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn fetch(&mut self) -> PhaseResult {
        let client = self.client()?;
        let config: NodeConfig = client.get(PATH_CONFIG).await.map_err(call("fetching the node config"))?;
        let mut csrs = Vec::new();
        for c in &config.certs {
            let owner = resolve_owner(&self.opts.root, c.owner.as_deref())?;
            let key = key_at(&paths::under(&self.opts.root, &c.key_path), owner)?;
            csrs.push(CsrRequest { purpose: c.purpose, csr: csr(&key, None)? });
        }
        let certs = if csrs.is_empty() {
            Vec::new()
        } else {
            client
                .post::<_, SignResponse>(PATH_SIGN, &SignRequest { csrs })
                .await
                .map_err(call("asking for certificates"))?
                .certs
        };
        let msg =
            format!("{} files, {} units, {} certificates signed", config.files.len(), config.units.len(), certs.len());
        self.record.config = Some(config);
        self.record.certs = certs;
        Ok(msg)
    }

    fn write_files(&mut self) -> PhaseResult {
        let config = self.record.need(&self.record.config, "node config")?;
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
            Some(identity::node_interface(root, &config.host).ok_or_else(|| PhaseError::NoInterface {
                mac: config.host.interface_mac.clone().unwrap_or_else(|| "-".into()),
                address: config.host.interface_address.clone().unwrap_or_else(|| "-".into()),
            })?)
        } else {
            None
        };
        for f in config.files.iter().cloned().chain(cert_files) {
            if !f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
                return Err(PhaseError::BadPath(f.path));
            }
            let path = paths::under(root, &f.path);
            let owner = resolve_owner(root, f.owner.as_deref())?;
            if let Some(dir) = path.parent() {
                ensure_dir(dir, 0o755).at(dir)?;
            }
            let contents = match (&interface, f.expand) {
                (Some(name), true) => f.contents.replace(INTERFACE_PLACEHOLDER, name),
                _ => f.contents,
            };
            write_atomic(&path, contents.as_bytes(), f.mode, owner).at(&path)?;
            n += 1;
        }
        Ok(match interface {
            Some(name) => format!("wrote {n} files (interface {name})"),
            None => format!("wrote {n} files"),
        })
    }

    fn host_setup(&mut self) -> PhaseResult {
        let host = self.record.need(&self.record.config, "node config")?.host.clone();
        self.host.set_hostname(&host.hostname)?;
        for m in &host.modules {
            self.host.load_module(m)?;
        }
        for (k, v) in &host.sysctls {
            self.host.sysctl(k, v)?;
        }
        if host.swap_off {
            self.host.swap_off()?;
        }
        for d in &host.data_disks {
            self.host.mount_data_disk(d)?;
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
        let units = self.record.need(&self.record.config, "node config")?.units.clone();
        self.systemd.daemon_reload().await?;
        let enable: Vec<String> = units.iter().filter(|u| u.enable).map(|u| u.name.clone()).collect();
        self.systemd.enable(&enable).await?;
        let mut started = Vec::new();
        for u in units.iter().filter(|u| u.start) {
            if u.restart {
                self.systemd.restart(&u.name).await?;
            } else {
                self.systemd.start(&u.name).await?;
            }
            started.push(u.name.as_str());
        }
        Ok(if started.is_empty() { "no units to start".into() } else { format!("started {}", started.join(", ")) })
    }

    async fn join(&mut self) -> PhaseResult {
        let Some(spec) = self.record.need(&self.record.config, "node config")?.join.clone() else {
            self.record.outcome = "provisioned".into();
            return Ok("no join for this role".into());
        };
        if !self.opts.join {
            self.record.outcome = "provisioned (join skipped)".into();
            return Ok("skipped (--no-join)".into());
        }
        let client = self.client()?;
        let msg = join::join(&spec, &self.opts.root, &mut self.systemd, &client, self.deadline).await?;
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

/// Fetches a payload named on the kernel command line. Over `https://` the server is trusted
/// only under `pin`. Over plain `http://` (what PXE firmware speaks) a payload is taken only if
/// it carries no credential and names the same pin: nothing secret travels in clear, and the
/// enrollment it leads to is pinned.
async fn fetch_remote(
    url: &str,
    pin: proto::pin::CaPin,
    backoff: &Backoff,
    deadline: Instant,
) -> Result<BootConfig, PhaseError> {
    let text = if let Some(rest) = url.strip_prefix("https://") {
        let (origin, path) = match rest.find('/') {
            Some(i) => (format!("https://{}", &rest[..i]), &rest[i..]),
            None => (url.to_string(), "/"),
        };
        let mut client = Client::new(&[origin], pin, None, deadline)?;
        client.backoff = backoff.clone();
        client.get::<serde_json::Value>(path).await.map_err(call("fetching the payload"))?.to_string()
    } else if url.starts_with("http://") {
        let get = || async {
            let r = reqwest::get(url).await.map_err(|e| proto::error_chain(&e))?;
            if !r.status().is_success() {
                return Err(format!("HTTP {}", r.status()));
            }
            r.text().await.map_err(|e| e.to_string())
        };
        backoff.retry(url, deadline, get, |_| true).await.map_err(|r| match r {
            client::Retried::Final(e) | client::Retried::Deadline(_, e) => {
                PhaseError::Payload(source::SourceError::Invalid { source_name: url.into(), message: e })
            }
        })?
    } else {
        return Err(PhaseError::InsecurePayload { url: url.into(), reason: "is neither https:// nor http://" });
    };
    let config = source::parse_payload(&text, url)?;
    if url.starts_with("http://") {
        if config.token.is_some() {
            return Err(PhaseError::InsecurePayload {
                url: url.into(),
                reason: "carries a credential over plain HTTP: refused",
            });
        }
        if config.ca_pin != pin {
            return Err(PhaseError::InsecurePayload {
                url: url.into(),
                reason: "names another CA pin than the kernel command line",
            });
        }
    }
    Ok(config)
}
