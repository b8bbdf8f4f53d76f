//! Bootstrap tokens: Kubernetes join tokens (usages `authentication`, `signing`) and our
//! enrollment credentials (usage `enrollment`): a node's one-time credential, bound to one
//! inventory node, and the worker token, bound to the worker role. Kept in `tokens.json` (0600)
//! in the state dir. Use counts live with the enrollment server's store, not here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::{BootstrapToken, Role};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The group kubeadm gives join tokens; the RBAC bindings we render are for it.
pub const DEFAULT_NODE_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";

/// What a token may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenUsage {
    /// Kubernetes: authenticate as `system:bootstrap:<id>` (kubelet TLS bootstrap).
    Authentication,
    /// Kubernetes: the bootstrap signer signs `cluster-info` with it.
    Signing,
    /// imgbuild serve: enroll a machine of the token's role.
    Enrollment,
}

impl std::str::FromStr for TokenUsage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "authentication" => Ok(TokenUsage::Authentication),
            "signing" => Ok(TokenUsage::Signing),
            "enrollment" => Ok(TokenUsage::Enrollment),
            _ => Err(format!("unknown token usage '{s}' (valid: authentication, signing, enrollment)")),
        }
    }
}

impl TokenUsage {
    /// The lowercase name used in `tokens.json`, Secrets and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenUsage::Authentication => "authentication",
            TokenUsage::Signing => "signing",
            TokenUsage::Enrollment => "enrollment",
        }
    }
}

/// One token in `tokens.json`, with its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRecord {
    /// The token itself (id and secret).
    pub token: BootstrapToken,
    /// What it is for, as the operator or `init` wrote it.
    pub description: String,
    /// When it was created; the newest valid token of a kind is the one used.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// `None`: never expires.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires: Option<OffsetDateTime>,
    /// Kubernetes usages, or `enrollment` alone.
    pub usages: BTreeSet<TokenUsage>,
    /// Kubernetes: extra `system:bootstrappers:` groups it authenticates as.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Enrollment tokens: the role a machine enrolling with this token gets.
    #[serde(default)]
    pub role: Option<Role>,
    /// A node's credential: the one inventory node it may enroll as (once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Enrollment tokens: how many machines may enroll with it (`None`: no limit).
    #[serde(default)]
    pub max_uses: Option<u32>,
    /// When it was revoked; a revoked token is never valid again.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked: Option<OffsetDateTime>,
}

/// Whether a token may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Neither expired nor revoked.
    Valid,
    /// Past its expiry.
    Expired,
    /// Revoked by the operator or `init --rotate`.
    Revoked,
}

impl TokenState {
    /// The word `imgbuild token list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

impl TokenRecord {
    /// The token's public id.
    pub fn id(&self) -> &str {
        self.token.id()
    }

    /// Whether it may be used at `now` (revocation wins over expiry).
    pub fn state(&self, now: OffsetDateTime) -> TokenState {
        if self.revoked.is_some() {
            TokenState::Revoked
        } else if self.expires.is_some_and(|e| e <= now) {
            TokenState::Expired
        } else {
            TokenState::Valid
        }
    }

    /// A Kubernetes bootstrap token (rendered as a Secret), as opposed to an enrollment token.
    pub fn is_kubernetes(&self) -> bool {
        !self.usages.contains(&TokenUsage::Enrollment)
    }
}

/// What `token create` asks for.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// How long it stays valid; `None`: never expires.
    pub ttl: Option<Duration>,
    /// What it may be used for: Kubernetes usages, or `enrollment` alone.
    pub usages: BTreeSet<TokenUsage>,
    /// Kubernetes: extra bootstrap groups (needs `authentication`).
    pub groups: Vec<String>,
    /// What it is for.
    pub description: String,
    /// Enrollment: the role a machine enrolling with it gets (required).
    pub role: Option<Role>,
    /// A node's credential: the inventory node it is for.
    pub node: Option<String>,
    /// Enrollment: how many machines may use it; a node's credential must say 1.
    pub max_uses: Option<u32>,
}

/// Why a token cannot be read, stored or made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `tokens.json` exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `tokens.json` does not parse.
    #[error("{path} is not a valid token file: {reason}")]
    Parse {
        /// The token file.
        path: PathBuf,
        /// The parser's reason.
        reason: String,
    },
    /// `tokens.json` cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The token file.
        path: PathBuf,
        /// The I/O (or serialization) error.
        #[source]
        source: std::io::Error,
    },
    /// No token has this id.
    #[error("no token with id '{0}' (see `imgbuild token list`)")]
    NotFound(String),
    /// The request breaks a rule (the rule).
    #[error("invalid token request: {0}")]
    Invalid(String),
}

/// Kubernetes' rule for `auth-extra-groups`: `system:bootstrappers:[a-z0-9:-]{0,255}[a-z0-9]`.
pub fn is_valid_bootstrap_group(g: &str) -> bool {
    let Some(rest) = g.strip_prefix("system:bootstrappers:") else { return false };
    !rest.is_empty()
        && rest.len() <= 256
        && rest.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b':' || b == b'-')
        && rest.as_bytes()[rest.len() - 1].is_ascii_alphanumeric()
}

/// `tokens.json`, loaded: every token, with the file to save them to.
pub struct TokenStore {
    path: PathBuf,
    /// Every token, in creation order, revoked and expired ones included.
    pub records: Vec<TokenRecord>,
}

impl TokenStore {
    /// Loads `tokens.json`; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let records = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| TokenError::Parse { path: path.to_path_buf(), reason: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(TokenError::Read { path: path.to_path_buf(), source }),
        };
        Ok(Self { path: path.to_path_buf(), records })
    }

    /// Writes every record back, atomically (0600).
    pub fn save(&self) -> Result<(), TokenError> {
        let json = serde_json::to_vec_pretty(&self.records)
            .map_err(|e| TokenError::Write { path: self.path.clone(), source: e.into() })?;
        proto::fsutil::write_atomic(&self.path, &json, 0o600, None)
            .map_err(|source| TokenError::Write { path: self.path.clone(), source })
    }

    /// Creates a token after checking the request against Kubernetes' and our rules.
    pub fn create(&mut self, req: NewToken, now: OffsetDateTime) -> Result<&TokenRecord, TokenError> {
        let invalid = |m: String| Err(TokenError::Invalid(m));
        if req.usages.is_empty() {
            return invalid("a token needs at least one usage (authentication, signing, enrollment)".into());
        }
        let enrollment = req.usages.contains(&TokenUsage::Enrollment);
        if enrollment && req.usages.len() > 1 {
            return invalid("an enrollment token cannot also be a Kubernetes token (authentication/signing): they are trusted by different servers".into());
        }
        if enrollment && req.role.is_none() {
            return invalid("an enrollment token needs --role (master, worker or etcd)".into());
        }
        if !enrollment && (req.role.is_some() || req.max_uses.is_some() || req.node.is_some()) {
            return invalid("--role, --node and --max-uses apply to enrollment tokens only".into());
        }
        if enrollment && req.node.is_none() && req.role != Some(Role::Worker) {
            return invalid(
                "a role token enrolls workers only: a master or etcd member proves itself with its own credential (--node NAME) or the operator's approval".into(),
            );
        }
        if req.node.is_some() && req.max_uses != Some(1) {
            return invalid("a node's credential is good for one machine (--max-uses 1)".into());
        }
        if !req.groups.is_empty() && !req.usages.contains(&TokenUsage::Authentication) {
            return invalid("extra groups need the authentication usage".into());
        }
        if let Some(g) = req.groups.iter().find(|g| !is_valid_bootstrap_group(g)) {
            return invalid(format!("group '{g}' must match system:bootstrappers:[a-z0-9:-]{{0,255}}[a-z0-9]"));
        }
        if req.ttl.is_some_and(|t| t.is_zero()) {
            return invalid("the TTL must be longer than zero (omit it for a token that never expires)".into());
        }
        let mut token = BootstrapToken::generate();
        while self.records.iter().any(|r| r.id() == token.id()) {
            token = BootstrapToken::generate();
        }
        self.records.push(TokenRecord {
            token,
            description: req.description,
            created: now,
            expires: req.ttl.map(|t| truncate_to_seconds(now + t)),
            usages: req.usages,
            groups: req.groups,
            role: req.role,
            node: req.node,
            max_uses: req.max_uses,
            revoked: None,
        });
        #[expect(clippy::expect_used, reason = "the record was pushed on the line above")]
        Ok(self.records.last().expect("just pushed"))
    }

    /// Marks token `id` revoked at `now` (an earlier revocation stands).
    pub fn revoke(&mut self, id: &str, now: OffsetDateTime) -> Result<&TokenRecord, TokenError> {
        let rec = self.records.iter_mut().find(|r| r.id() == id).ok_or_else(|| TokenError::NotFound(id.to_string()))?;
        rec.revoked.get_or_insert(now);
        Ok(rec)
    }

    /// The token with this id.
    pub fn get(&self, id: &str) -> Option<&TokenRecord> {
        self.records.iter().find(|r| r.id() == id)
    }

    /// The newest valid Kubernetes join token (authentication usage).
    pub fn join_token(&self, now: OffsetDateTime) -> Option<&TokenRecord> {
        join_token(&self.records, now)
    }

    /// The newest valid role token for `role` (node credentials excluded).
    pub fn enrollment_token(&self, role: Role, now: OffsetDateTime) -> Option<&TokenRecord> {
        self.records
            .iter()
            .filter(|r| r.role == Some(role) && r.node.is_none() && r.state(now) == TokenState::Valid)
            .max_by_key(|r| r.created)
    }

    /// The newest valid credential of inventory node `name`.
    pub fn node_credential(&self, name: &str, now: OffsetDateTime) -> Option<&TokenRecord> {
        self.records
            .iter()
            .filter(|r| r.node.as_deref() == Some(name) && r.state(now) == TokenState::Valid)
            .max_by_key(|r| r.created)
    }
}

/// RFC 3339 with whole seconds, as the bootstrap token Secret's `expiration` is written.
fn truncate_to_seconds(t: OffsetDateTime) -> OffsetDateTime {
    #[expect(clippy::expect_used, reason = "0 is a valid nanosecond (0..1_000_000_000)")]
    t.replace_nanosecond(0).expect("0 ns is valid")
}

/// The newest valid join (TLS bootstrap) token among `records`.
pub fn join_token(records: &[TokenRecord], now: OffsetDateTime) -> Option<&TokenRecord> {
    records
        .iter()
        .filter(|r| r.usages.contains(&TokenUsage::Authentication) && r.state(now) == TokenState::Valid)
        .max_by_key(|r| r.created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(usages: &[TokenUsage]) -> NewToken {
        NewToken {
            ttl: Some(Duration::from_secs(3600)),
            usages: usages.iter().copied().collect(),
            groups: vec![],
            description: "t".into(),
            role: None,
            node: None,
            max_uses: None,
        }
    }

    #[test]
    fn create_list_revoke_persist() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tokens.json");
        let now = OffsetDateTime::now_utc();
        let mut s = TokenStore::load(&path).unwrap();
        let id = s.create(req(&[TokenUsage::Authentication, TokenUsage::Signing]), now).unwrap().id().to_string();
        let mut e = req(&[TokenUsage::Enrollment]);
        e.role = Some(Role::Worker);
        e.max_uses = Some(3);
        s.create(e, now).unwrap();
        s.save().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let mut s = TokenStore::load(&path).unwrap();
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.join_token(now).unwrap().id(), id);
        assert!(s.enrollment_token(Role::Worker, now).is_some());
        assert!(s.enrollment_token(Role::Master, now).is_none());
        s.revoke(&id, now).unwrap();
        assert_eq!(s.get(&id).unwrap().state(now), TokenState::Revoked);
        assert!(s.join_token(now).is_none());
        assert!(matches!(s.revoke("zzzzzz", now), Err(TokenError::NotFound(_))));
        let later = now + Duration::from_secs(7200);
        assert_eq!(s.records[1].state(later), TokenState::Expired);
    }

    #[test]
    fn request_rules() {
        let now = OffsetDateTime::now_utc();
        let mut s = TokenStore { path: "/nonexistent".into(), records: vec![] };
        let cases: Vec<(&str, NewToken, Option<&str>)> = vec![
            ("no usage", req(&[]), Some("at least one usage")),
            ("mixed", req(&[TokenUsage::Enrollment, TokenUsage::Signing]), Some("cannot also be")),
            ("enrollment without role", req(&[TokenUsage::Enrollment]), Some("--role")),
            (
                "bad group",
                NewToken { groups: vec!["system:masters".into()], ..req(&[TokenUsage::Authentication]) },
                Some("must match"),
            ),
            (
                "group without auth",
                NewToken { groups: vec!["system:bootstrappers:x".into()], ..req(&[TokenUsage::Signing]) },
                Some("authentication usage"),
            ),
            (
                "good group",
                NewToken { groups: vec!["system:bootstrappers:rack-1".into()], ..req(&[TokenUsage::Authentication]) },
                None,
            ),
            (
                "a role token for masters",
                NewToken { role: Some(Role::Master), ..req(&[TokenUsage::Enrollment]) },
                Some("enrolls workers only"),
            ),
            (
                "a node credential for two machines",
                NewToken {
                    role: Some(Role::Master),
                    node: Some("k8s-master1".into()),
                    max_uses: Some(2),
                    ..req(&[TokenUsage::Enrollment])
                },
                Some("one machine"),
            ),
            (
                "a node credential",
                NewToken {
                    role: Some(Role::Master),
                    node: Some("k8s-master1".into()),
                    max_uses: Some(1),
                    ..req(&[TokenUsage::Enrollment])
                },
                None,
            ),
            (
                "zero ttl",
                NewToken { ttl: Some(Duration::ZERO), ..req(&[TokenUsage::Signing]) },
                Some("longer than zero"),
            ),
        ];
        for (name, r, want) in cases {
            match (s.create(r, now), want) {
                (Ok(_), None) => {}
                (Err(e), Some(frag)) => assert!(e.to_string().contains(frag), "{name}: {e}"),
                (got, want) => panic!("{name}: {:?} vs {want:?}", got.map(|r| r.id().to_string())),
            }
        }
        assert!(is_valid_bootstrap_group(DEFAULT_NODE_GROUP));
        assert!(!is_valid_bootstrap_group("system:bootstrappers:"));
        assert!(!is_valid_bootstrap_group("system:bootstrappers:x-"));
    }
}
