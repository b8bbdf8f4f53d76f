//! One function per subcommand, each taking its parsed options. Human-readable progress goes to
//! stderr; stdout carries only what a script would consume (tokens, JSON, tables).

use std::io::Write;

use anyhow::{Context, Result, bail};
use time::OffsetDateTime;

use crate::cli::{Global, InitArgs, TokenCommand, TokenCreateArgs, ValidateArgs};
use crate::cluster::{Cluster, parse_duration};
use crate::state::{self, State};
use crate::tokens::{NewToken, TokenState, TokenUsage};

/// Exit codes, as `imgbuild --help` documents them.
pub mod exit {
    pub const ERROR: u8 = 1;
    pub const INVALID_INPUT: u8 = 3;
    pub const MISSING: u8 = 4;
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
    }
    exit::ERROR
}

/// A user-supplied value that is not valid; maps to exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

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

pub fn token(global: &Global, cmd: &TokenCommand) -> Result<()> {
    let st = State::new(&global.state);
    let cluster = st.cluster()?;
    let mut tokens = st.tokens()?;
    let now = OffsetDateTime::now_utc();
    match cmd {
        TokenCommand::Create(a) => {
            let req = new_token(a)?;
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
            if !firstboot::BootstrapToken::is_valid_id(&a.id) {
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

fn new_token(a: &TokenCreateArgs) -> Result<NewToken> {
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
    if a.role.is_some() && !a.usages.contains(&TokenUsage::Enrollment) {
        bail!(InvalidInput("--role needs --usages enrollment".into()));
    }
    Ok(NewToken { ttl, usages, groups, description: a.description.clone(), role: a.role, max_uses: a.max_uses })
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).expect("valid time")
}
