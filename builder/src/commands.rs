//! One function per subcommand, each taking its parsed options. Human-readable progress goes to
//! stderr; stdout carries only what a script would consume (tokens, JSON, tables).

use std::io::Write;

use anyhow::{Context, Result, bail};
use time::OffsetDateTime;

use crate::cli::{Global, InitArgs, TokenCommand, TokenCreateArgs, ValidateArgs};
use crate::cluster::{Cluster, parse_duration};
use crate::image::BakeError;
use crate::state::{self, State};
use crate::tokens::{NewToken, TokenState, TokenUsage};

/// Exit codes, as `imgbuild --help` documents them.
pub mod exit {
    /// Any other failure.
    pub const ERROR: u8 = 1;
    /// An invalid manifest, definition, token or option value.
    pub const INVALID_INPUT: u8 = 3;
    /// No cluster state, or a host tool or file the command needs is missing.
    pub const MISSING: u8 = 4;
    /// A download or checksum failed.
    pub const FETCH: u8 = 5;
}

/// Maps an error chain to its exit code by the first cause we recognise.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        let invalid_manifest = matches!(cause.downcast_ref(), Some(crate::cluster::LoadError::Invalid(_)))
            || matches!(cause.downcast_ref(), Some(state::StateError::Manifest(crate::cluster::LoadError::Invalid(_))));
        if invalid_manifest
            || cause.is::<crate::cluster::Problems>()
            || cause.is::<crate::tokens::TokenError>()
            || cause.is::<InvalidInput>()
        {
            return exit::INVALID_INPUT;
        }
        if let Some(state::StateError::Missing(_)) = cause.downcast_ref::<state::StateError>() {
            return exit::MISSING;
        }
        if let Some(code) = image_exit_code(cause) {
            return code;
        }
    }
    exit::ERROR
}

/// Exit codes of the image commands (bake, lock, fetch), whose errors may come bare or wrapped.
fn image_exit_code(cause: &(dyn std::error::Error + 'static)) -> Option<u8> {
    use crate::image::{cache::CacheError, definition::DefinitionError, lock::LockError};
    if cause.is::<DefinitionError>() {
        return Some(exit::INVALID_INPUT);
    }
    if cause.is::<CacheError>() || matches!(cause.downcast_ref(), Some(LockError::Unreachable { .. })) {
        return Some(exit::FETCH);
    }
    // BakeError's wrapping variants are transparent: the wrapped error is not a cause of its own.
    match cause.downcast_ref::<BakeError>()? {
        BakeError::Definition(_) | BakeError::Role { .. } | BakeError::Version { .. } => Some(exit::INVALID_INPUT),
        // A tool that is not there is missing; one that ran and failed (a full disk) is an error.
        BakeError::Tool(crate::tools::ToolError::Missing { .. }) | BakeError::Firstboot(_) => Some(exit::MISSING),
        BakeError::Cache(_) | BakeError::Lock(LockError::Cache(_) | LockError::Unreachable { .. }) => Some(exit::FETCH),
        _ => None,
    }
}

/// A user-supplied value that is not valid; maps to exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// `imgbuild init`: creates or completes the state dir and prints what it did.
pub fn init(global: &Global, args: &InitArgs) -> Result<()> {
    let cluster = Cluster::load(args.manifest.as_deref())?;
    let st = State::new(&global.state);
    let report = state::init(&st, &cluster, &args.rotate)
        .with_context(|| format!("cannot initialise cluster state in {}", st.root.display()))?;
    let mut err = std::io::stderr().lock();
    for s in &report.steps {
        writeln!(err, "{:>9} {}", s.action, s.what)?;
    }
    for w in &report.warnings {
        writeln!(err, "  warning: {w}")?;
    }
    writeln!(err, "cluster '{}' state in {} ({} nodes)", cluster.name, st.root.display(), cluster.nodes.len())?;
    Ok(())
}

/// `imgbuild validate`: checks a manifest (the error lists every problem) and prints its summary.
pub fn validate(args: &ValidateArgs) -> Result<()> {
    let cluster = Cluster::load(args.manifest.as_deref())?;
    let file =
        args.manifest.as_ref().map_or(crate::cluster::DEFAULT_MANIFEST_NAME.to_string(), |p| p.display().to_string());
    eprintln!(
        "{file}: valid: cluster '{}', {} nodes ({} masters), API {}, etcd {}",
        cluster.name,
        cluster.nodes.len(),
        cluster.masters().count(),
        cluster.api.url(),
        cluster.etcd.as_str()
    );
    Ok(())
}

/// `imgbuild token create|list|revoke`.
pub fn token(global: &Global, cmd: &TokenCommand) -> Result<()> {
    let st = State::new(&global.state);
    let cluster = st.cluster()?;
    let mut tokens = st.tokens()?;
    let now = OffsetDateTime::now_utc();
    match cmd {
        TokenCommand::Create(a) => {
            let req = new_token(a, &cluster)?;
            let t = tokens.create(req, now)?.clone();
            tokens.save()?;
            st.render_kube_objects(&cluster, &tokens, now)?;
            if t.is_kubernetes() {
                eprintln!("rendered {}", st.kube_dir().join(format!("bootstrap-token-{}.yaml", t.id())).display());
            }
            println!("{}", t.token.expose());
        }
        TokenCommand::List(a) => {
            if a.json {
                let list: Vec<serde_json::Value> = tokens
                    .records
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id(),
                            "state": t.state(now).as_str(),
                            "usages": t.usages,
                            "groups": t.groups,
                            "role": t.role,
                            "maxUses": t.max_uses,
                            "expires": t.expires.map(rfc3339),
                            "description": t.description,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{:<6}  {:<8}  {:<27}  {:<7}  {:<8}  {:<20}  DESCRIPTION",
                    "ID", "STATE", "USAGES", "ROLE", "MAX-USES", "EXPIRES"
                )?;
                for t in &tokens.records {
                    let usages: Vec<&str> = t.usages.iter().map(|u| u.as_str()).collect();
                    writeln!(
                        out,
                        "{:<6}  {:<8}  {:<27}  {:<7}  {:<8}  {:<20}  {}",
                        t.id(),
                        t.state(now).as_str(),
                        usages.join(","),
                        t.role.map_or("-".to_string(), |r| r.to_string()),
                        t.max_uses.map_or("-".to_string(), |m| m.to_string()),
                        t.expires.map_or("never".to_string(), rfc3339),
                        t.description
                    )?;
                }
            }
        }
        TokenCommand::Revoke(a) => {
            if !proto::BootstrapToken::is_valid_id(&a.id) {
                return Err(InvalidInput(format!("'{}' is not a token id (six characters of [a-z0-9])", a.id)).into());
            }
            let t = tokens.revoke(&a.id, now)?.clone();
            tokens.save()?;
            st.render_kube_objects(&cluster, &tokens, now)?;
            eprintln!("revoked token {}", t.id());
            if t.is_kubernetes() {
                eprintln!(
                    "remove it from a running cluster with: kubectl -n kube-system delete secret bootstrap-token-{}",
                    t.id()
                );
            }
            debug_assert_eq!(t.state(now), TokenState::Revoked);
        }
    }
    Ok(())
}

fn new_token(a: &TokenCreateArgs, cluster: &Cluster) -> Result<NewToken> {
    let ttl = if a.ttl == "0" {
        None
    } else {
        Some(parse_duration(&a.ttl).map_err(|e| InvalidInput(format!("--ttl: {e}")))?)
    };
    let usages = a.usages.iter().copied().collect();
    let mut groups = a.groups.clone();
    if groups.is_empty() && a.usages.contains(&TokenUsage::Authentication) {
        groups.push(crate::tokens::DEFAULT_NODE_GROUP.to_string());
    }
    if (a.role.is_some() || a.node.is_some()) && !a.usages.contains(&TokenUsage::Enrollment) {
        bail!(InvalidInput("--role and --node need --usages enrollment".into()));
    }
    let (role, max_uses) = match &a.node {
        // A node's credential: its inventory role, one machine.
        Some(name) => {
            let node =
                cluster.node(name).ok_or_else(|| InvalidInput(format!("--node: no node {name} in the inventory")))?;
            if a.role.is_some_and(|r| r != node.role) {
                bail!(InvalidInput(format!("--role: {name} is a {} in the inventory", node.role)));
            }
            (Some(node.role), Some(a.max_uses.unwrap_or(1)))
        }
        None => (a.role, a.max_uses),
    };
    Ok(NewToken { ttl, usages, groups, description: a.description.clone(), role, node: a.node.clone(), max_uses })
}

/// For display; a time RFC 3339 cannot write (a year past 9999) is shown as `time` writes it.
fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// Written by `imgbuild serve` while it runs, so that `imgbuild nodes` finds it.
#[derive(serde::Serialize, serde::Deserialize)]
struct ServeRun {
    listen: std::net::SocketAddr,
    pid: u32,
}

fn serve_run_file(st: &State) -> std::path::PathBuf {
    st.root.join("serve.json")
}

/// `imgbuild serve`: runs the enrollment server until SIGTERM or Ctrl-C.
pub fn serve(global: &Global, args: &crate::cli::ServeArgs) -> Result<()> {
    use crate::serve::{Backend, ServeOptions, store::EtcdConfig};
    let st = State::new(&global.state);
    st.cluster()?;
    let read = |p: &Option<std::path::PathBuf>| -> Result<Option<String>> {
        p.as_ref()
            .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
            .transpose()
    };
    let backend = if args.etcd_endpoints.is_empty() {
        Backend::Embedded
    } else {
        Backend::Etcd(EtcdConfig {
            endpoints: args.etcd_endpoints.clone(),
            ca_pem: read(&args.etcd_ca)?,
            client_cert_pem: read(&args.etcd_cert)?,
            client_key_pem: read(&args.etcd_key)?,
            prefix: String::new(),
        })
    };
    let opts = ServeOptions {
        listen: args.listen,
        backend,
        audit_file: true,
        boot: args.boot_listen.zip(args.boot_dir.clone()).map(|(addr, dir)| crate::serve::boot::BootListen {
            addr,
            dir,
            root: args.boot_root,
        }),
        limits: crate::serve::conn::Limits {
            connections: args.max_connections,
            headers: std::time::Duration::from_secs(args.header_timeout),
            request: std::time::Duration::from_secs(args.request_timeout),
            idle: std::time::Duration::from_secs(args.idle_timeout),
            failures_per_minute: args.failures_per_minute,
            ..Default::default()
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let running = crate::serve::start(&st, &opts).await?;
        let run = ServeRun { listen: running.addr, pid: std::process::id() };
        proto::fsutil::write_atomic(&serve_run_file(&st), &serde_json::to_vec(&run)?, 0o600, None)?;
        eprintln!("serving enrollment on https://{} (state {})", running.addr, st.root.display());
        running.until(shutdown_signal(term)).await;
        let _ = std::fs::remove_file(serve_run_file(&st));
        Ok(())
    })
}

async fn shutdown_signal(mut term: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The operator's client for `imgbuild serve`: the state dir's admin identity, the server
/// trusted under the cluster CA.
struct AdminClient {
    http: reqwest::Client,
    url: String,
}

impl AdminClient {
    fn new(st: &State, url: String) -> Result<Self> {
        let read =
            |p: std::path::PathBuf| std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()));
        let (cert, key) = (read(st.serve_admin_cert())?, read(st.serve_admin_key())?);
        let ca = read(st.pki_dir().join(crate::pki::CaKind::Cluster.cert_file()))?;
        let tls = proto::tls::client_config(&ca, Some((&cert, &key)))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        Ok(AdminClient { http, url })
    }

    /// A call of the operator's API; the server's error body becomes the error.
    async fn call<R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<R> {
        let url = format!("{}{path}", self.url);
        let req = match body {
            Some(b) => self.http.post(&url).json(b),
            None => self.http.get(&url),
        };
        let r = req.send().await.with_context(|| format!("cannot reach {}", self.url))?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            let reason = serde_json::from_str::<proto::wire::ErrorBody>(&text).map_or(text, |b| b.error);
            bail!("{url}: {status}: {reason}");
        }
        Ok(serde_json::from_str(if text.is_empty() { "null" } else { &text })?)
    }
}

fn server_url(st: &State, given: &Option<String>) -> Result<String> {
    if let Some(s) = given {
        return Ok(s.trim_end_matches('/').to_string());
    }
    let text = std::fs::read(serve_run_file(st))
        .with_context(|| format!("no imgbuild serve is running from {} (give --server URL)", st.root.display()))?;
    let run: ServeRun = serde_json::from_slice(&text)?;
    let ip = if run.listen.ip().is_unspecified() { std::net::IpAddr::from([127, 0, 0, 1]) } else { run.listen.ip() };
    Ok(format!("https://{}", std::net::SocketAddr::new(ip, run.listen.port())))
}

/// `imgbuild nodes`: lists the server's machines, or approves, resets or revokes one.
pub fn nodes(global: &Global, args: &crate::cli::NodesArgs) -> Result<()> {
    use crate::cli::NodesCommand as C;
    use proto::wire::*;
    let st = State::new(&global.state);
    let cluster = st.cluster()?;
    let admin = AdminClient::new(&st, server_url(&st, &args.server)?)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match &args.command {
            Some(C::Approve(a)) => {
                let req = ApproveRequest { machine: a.machine.clone(), key: a.key.clone(), name: a.name.clone(), role: a.role };
                let s: NodeStatus = admin.call(PATH_NODES_APPROVE, Some(&req)).await?;
                eprintln!(
                    "approved {} (key {}) as {} node {}: it binds when it asks again",
                    s.machine,
                    s.key.unwrap_or_default(),
                    s.role,
                    s.node.unwrap_or_default()
                );
            }
            Some(C::Reset(a)) => {
                let () = admin.call(PATH_NODES_RESET, Some(&ResetRequest { node: a.node.clone() })).await?;
                eprintln!("node {} is unbound: a machine may enroll as it again", a.node);
                // An inventory node gets a new credential (its old one is spent or revoked).
                if let Some(node) = cluster.node(&a.node) {
                    let now = OffsetDateTime::now_utc();
                    let mut tokens = st.tokens()?;
                    let old: Vec<String> = tokens
                        .records
                        .iter()
                        .filter(|t| t.node.as_deref() == Some(node.name.as_str()) && t.state(now) == TokenState::Valid)
                        .map(|t| t.id().to_string())
                        .collect();
                    for id in old {
                        tokens.revoke(&id, now)?;
                    }
                    let t = tokens.create(
                        NewToken {
                            ttl: Some(cluster.enrollment.enrollment_token_ttl),
                            usages: [TokenUsage::Enrollment].into_iter().collect(),
                            groups: vec![],
                            description: format!("{} {} (imgbuild nodes reset)", node.role, node.name),
                            role: Some(node.role),
                            node: Some(node.name.clone()),
                            max_uses: Some(1),
                        },
                        now,
                    )?;
                    let id = t.id().to_string();
                    tokens.save()?;
                    eprintln!(
                        "new credential {id} for {}: hand the machine a new payload (imgbuild payload --role {} --node {}), or approve it when it asks",
                        node.name, node.role, node.name
                    );
                }
            }
            Some(C::Revoke(a)) => {
                let req = RevokeRequest { node: a.node.clone(), token: a.token.clone() };
                let r: RevokeResponse = admin.call(PATH_NODES_REVOKE, Some(&req)).await?;
                if r.revoked.is_empty() {
                    eprintln!("nothing to revoke");
                }
                for n in &r.revoked {
                    eprintln!("revoked node {n}: its certificate is refused from its next request on");
                }
            }
            None => {
                let list: Vec<NodeStatus> = admin.call(PATH_NODES, None::<&()>).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                } else {
                    print_nodes(&list)?;
                }
            }
        }
        Ok(())
    })
}

fn print_nodes(list: &[proto::wire::NodeStatus]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16} {:<7} {:<9} {:<12} {:<15} {:<10} {:<20} MESSAGE",
        "NODE", "ROLE", "STATE", "PROOF", "PHASE", "STATUS", "LAST REPORT"
    )?;
    for n in list {
        writeln!(
            out,
            "{:<16} {:<7} {:<9} {:<12} {:<15} {:<10} {:<20} {}",
            n.node.as_deref().unwrap_or("-"),
            n.role,
            n.state.as_str(),
            n.proof.map_or("-", |p| p.as_str()),
            n.phase.map_or("-", |p| p.as_str()),
            n.status.map_or("-", |s| s.as_str()),
            n.last_report_at.map_or("-".to_string(), rfc3339),
            match n.state {
                proto::wire::MachineState::Pending => format!(
                    "{} from {} asks with key {}: imgbuild nodes approve {} --key {}",
                    n.machine,
                    n.source,
                    n.key.as_deref().unwrap_or("-"),
                    n.machine,
                    n.key.as_deref().unwrap_or("-")
                ),
                _ => n.message.clone(),
            },
        )?;
        for k in &n.other_keys {
            writeln!(out, "    also asked with key {k} (a second machine claims this identity?)")?;
        }
        for c in &n.conflicts {
            writeln!(out, "    conflict: {} from {} with key {} at {}", c.machine, c.source, c.key, rfc3339(c.at))?;
        }
        for e in &n.errors {
            writeln!(out, "    error: {e}")?;
        }
    }
    Ok(())
}

fn cache_dir(args: &crate::cli::ImageArgs) -> std::path::PathBuf {
    args.cache.clone().unwrap_or_else(crate::image::cache::default_dir)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// The main job: `imgbuild --role ROLE ...`.
pub fn bake(global: &Global, args: &crate::cli::BakeArgs) -> Result<()> {
    use crate::image::{BakeOptions, bake};
    let st = State::new(&global.state);
    // The cluster in the state dir, or the embedded reference cluster when there is none.
    let cluster = if st.exists() { st.cluster()? } else { Cluster::load(None)? };
    let firstboot = match &args.firstboot {
        Some(f) => f.clone(),
        None => std::env::current_exe()?.with_file_name("firstboot"),
    };
    let opts = BakeOptions {
        image: args.image.image.clone(),
        roles: args.role.clone(),
        out: args.out.clone(),
        offline: args.image.offline,
        cache: cache_dir(&args.image),
        firstboot,
        fresh_tree: args.fresh_tree,
    };
    let pinned = cluster.versions.kubernetes.map(|v| (cluster.name.clone(), v.to_string()));
    let baked =
        runtime()?.block_on(bake(&opts, pinned)).with_context(|| format!("cannot bake {}", opts.image.display()))?;
    for b in &baked {
        let steps: Vec<String> = b.steps.iter().map(|(n, s)| format!("{n} {s:.1}s")).collect();
        eprintln!("{}: {} in {:.1}s ({})", b.role, b.dir.display(), b.seconds, steps.join(", "));
        println!("{}", b.dir.display());
    }
    Ok(())
}

/// `imgbuild lock`: resolves the image definition and writes its lock beside it.
pub fn lock(args: &crate::cli::LockArgs) -> Result<()> {
    use crate::image::{cache::Cache, definition::Definition, lock};
    let (def, text) = Definition::load(&args.image.image)?;
    let cache = Cache::open(&cache_dir(&args.image), args.image.offline)?;
    let l = runtime()?
        .block_on(lock::resolve(&def, &text, &cache))
        .with_context(|| format!("cannot lock {}", args.image.image.display()))?;
    let path = lock::lock_path(&args.image.image);
    l.save(&path, &args.image.image)?;
    eprintln!("{}: {} packages, {} components", path.display(), l.packages.len(), l.components.len());
    Ok(())
}

/// `imgbuild fetch`: puts every input of the locked images (of `--role`, or all) into the cache.
pub fn fetch(args: &crate::cli::FetchArgs) -> Result<()> {
    use crate::image::{fetch, lock, prepare};
    let rt = runtime()?;
    let (def, l, cache, _) = rt.block_on(prepare(&args.image.image, &cache_dir(&args.image), args.image.offline))?;
    let roles = if args.role.is_empty() { lock::roles(&def) } else { args.role.clone() };
    rt.block_on(fetch(&def, &l, &cache, &roles))
        .with_context(|| format!("cannot fetch the inputs of {}", args.image.image.display()))?;
    eprintln!("cache {} holds every input of {} ({} roles)", cache.root.display(), def.name, roles.len());
    Ok(())
}

/// `imgbuild payload`: writes a role's or a node's payload in the asked format.
pub fn payload(global: &Global, args: &crate::cli::PayloadArgs) -> Result<()> {
    use crate::cli::PayloadFormat as F;
    use crate::payload as p;
    let st = State::new(&global.state);
    let cluster = st.cluster()?;
    let node = args.node.as_deref().map(|n| p::node(&cluster, n, args.role)).transpose()?;
    let target = p::Target { role: args.role, node };
    let cfg = p::boot_config(&st, &cluster, &target)?;
    let text = match args.format {
        F::Json => p::config_json(&cfg) + "\n",
        F::Ignition => p::ignition(&cfg, &args.ignition_version)?,
        F::CloudInit => p::cloud_config(&cfg, &cluster, &target),
        F::Guestinfo => {
            let encoding: p::Encoding = args.encoding.parse().map_err(InvalidInput)?;
            let ign = p::ignition(&cfg, &args.ignition_version)?;
            let cc = p::cloud_config(&cfg, &cluster, &target);
            let pairs = p::guestinfo(&ign, &cc, encoding, p::GUESTINFO_LIMIT)?;
            let vm = node.map_or_else(|| format!("{}-{}", cluster.name, args.role), |n| n.name.clone());
            p::guestinfo_text(&pairs, &vm)
        }
        F::Ipxe => {
            if node.is_some_and(|n| n.mac.is_none()) {
                return Err(p::PayloadError::NoMac(args.node.clone().unwrap_or_default()).into());
            }
            let base = args.boot_url.clone().unwrap_or_else(|| p::default_boot_base(&cluster, args.role));
            p::ipxe(&cfg, &cluster, &target, &base, args.pxe_root)
        }
    };
    match &args.out {
        // The payload carries an enrollment token.
        Some(path) => proto::fsutil::write_atomic(path, text.as_bytes(), 0o600, None)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// `imgbuild pxe dnsmasq`: the dnsmasq configuration for the cluster's PXE network.
pub fn pxe_dnsmasq(global: &Global, args: &crate::cli::DnsmasqArgs) -> Result<()> {
    let cluster = State::new(&global.state).cluster()?;
    let dynamic = match &args.dynamic_range {
        None => None,
        Some(r) => {
            let bad = || {
                InvalidInput(format!(
                    "--dynamic-range '{r}': expected FIRST,LAST IPv4 addresses, e.g. 192.168.3.150,192.168.3.199"
                ))
            };
            let (a, b) = r.split_once(',').ok_or_else(bad)?;
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
                (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad().into());
            }
            if let Some(n) = cluster.nodes.iter().find(|n| (a..=b).contains(&n.ip())) {
                return Err(InvalidInput(format!(
                    "--dynamic-range {r} holds {}, the address of {}: choose a range outside the inventory's",
                    n.ip(),
                    n.name
                ))
                .into());
            }
            if !cluster.nodes.iter().any(|n| n.address.contains(&a) && n.address.contains(&b)) {
                return Err(InvalidInput(format!(
                    "--dynamic-range {r} is not inside any node network of the inventory"
                ))
                .into());
            }
            Some((a, b))
        }
    };
    let boot = args.boot_url.clone().unwrap_or_else(|| {
        let base = crate::payload::default_boot_base(&cluster, proto::Role::Worker);
        base.trim_end_matches("/worker").to_string()
    });
    let opts = crate::pxe::DnsmasqOptions {
        boot,
        interface: args.interface.clone(),
        dynamic,
        tftp_root: args.tftp_root.clone(),
        root: args.root,
    };
    let text = crate::pxe::dnsmasq(&cluster, &opts);
    match &args.out {
        Some(path) => proto::fsutil::write_atomic(path, text.as_bytes(), 0o644, None)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}
