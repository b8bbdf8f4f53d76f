//! Image definitions (`images/<name>.toml`): the base (suite, mirror, archive keyring), the
//! packages per role, and components pinned by digest, from a URL or a local file. Parsed with
//! unknown keys refused, then checked: every component pinned, every install path absolute,
//! every role known.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proto::Role;
use serde::Deserialize;

use crate::cluster::KubeVersion;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Definition {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The Kubernetes version the components carry.
    pub kubernetes: String,
    pub base: Base,
    pub packages: Packages,
    #[serde(default, rename = "component")]
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Base {
    /// `debian` or `ubuntu`.
    pub distribution: String,
    pub suite: String,
    #[serde(default)]
    pub extra_suites: Vec<String>,
    pub mirror: String,
    pub components: Vec<String>,
    pub keyring: Keyring,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Keyring {
    /// The keyring file (on this machine, or inside `package`).
    pub path: String,
    pub sha256: String,
    /// Where the keyring comes from when this machine does not have it: a Debian package, and
    /// `"MIRROR SUITE"` to get it from.
    #[serde(default)]
    pub package: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Packages {
    #[serde(default)]
    pub all: Vec<String>,
    #[serde(default)]
    pub master: Vec<String>,
    #[serde(default)]
    pub worker: Vec<String>,
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Paths (globs, relative to /) removed from the tree.
    #[serde(default)]
    pub trim: Vec<String>,
}

impl Packages {
    /// The packages a role's image installs (besides the base system).
    pub fn for_role(&self, role: Role) -> Vec<String> {
        let extra = match role {
            Role::Master => &self.master,
            Role::Worker => &self.worker,
            Role::Etcd => &self.etcd,
        };
        let mut v: Vec<String> = self.all.iter().chain(extra).cloned().collect();
        v.sort();
        v.dedup();
        v
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Component {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub sha512: Option<String>,
    pub install: Vec<Install>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Install {
    /// Inside an archive: a file, or a directory ending in `/` (everything under it).
    #[serde(default)]
    pub from: Option<String>,
    /// Absolute path in the image; a directory when it ends in `/`.
    pub to: String,
    pub roles: Vec<Role>,
}

impl Component {
    /// Whether the source is a tar archive (by its name).
    pub fn is_archive(&self) -> bool {
        let name = self.url.clone().or_else(|| self.file.as_ref().map(|f| f.display().to_string())).unwrap_or_default();
        name.ends_with(".tar.gz") || name.ends_with(".tgz") || name.ends_with(".tar")
    }

    pub fn source(&self) -> String {
        self.url.clone().unwrap_or_else(|| self.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default())
    }

    pub fn for_role(&self, role: Role) -> bool {
        self.install.iter().any(|i| i.roles.contains(&role))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read image definition {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Definition {
    pub fn load(path: &Path) -> Result<(Definition, String), DefinitionError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| DefinitionError::Read { path: path.to_path_buf(), source })?;
        let def = Definition::parse(&text, path)?;
        Ok((def, text))
    }

    pub fn parse(text: &str, path: &Path) -> Result<Definition, DefinitionError> {
        let invalid = |message: String| DefinitionError::Invalid { path: path.to_path_buf(), message };
        let def: Definition = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut problems = Vec::new();
        if !crate::cluster::is_dns_subdomain(&def.name) {
            problems.push(format!(
                "name '{}' must be an RFC 1123 subdomain: lowercase letters, digits, '-' and '.'",
                def.name
            ));
        }
        if let Err(e) = def.kubernetes.parse::<KubeVersion>() {
            problems.push(format!("kubernetes: {e}"));
        }
        if !["debian", "ubuntu"].contains(&def.base.distribution.as_str()) {
            problems.push(format!("base.distribution '{}': debian or ubuntu", def.base.distribution));
        }
        if !is_hex(&def.base.keyring.sha256, 64) {
            problems.push("base.keyring.sha256 must be 64 lowercase hex digits".into());
        }
        if def.base.keyring.package.is_some() != def.base.keyring.from.is_some() {
            problems.push("base.keyring: package and from go together".into());
        }
        let mut names = BTreeSet::new();
        let mut targets = BTreeSet::new();
        for (i, c) in def.components.iter().enumerate() {
            let at = format!("component[{i}] ({})", c.name);
            if !names.insert(c.name.clone()) {
                problems.push(format!("{at}: a second component with this name"));
            }
            match (&c.url, &c.file) {
                (Some(u), None) if u.starts_with("https://") || u.starts_with("http://") => {}
                (Some(u), None) => problems.push(format!("{at}: url '{u}' must be http(s)")),
                (None, Some(f)) if f.is_absolute() => {}
                (None, Some(f)) => problems.push(format!("{at}: file '{}' must be an absolute path", f.display())),
                _ => problems.push(format!("{at}: give exactly one of url and file")),
            }
            match (&c.sha256, &c.sha512) {
                (None, None) => {
                    problems.push(format!("{at}: not pinned: give the sha256 (or sha512) its upstream publishes"))
                }
                (Some(h), _) if !is_hex(h, 64) => {
                    problems.push(format!("{at}: sha256 must be 64 lowercase hex digits"))
                }
                (_, Some(h)) if !is_hex(h, 128) => {
                    problems.push(format!("{at}: sha512 must be 128 lowercase hex digits"))
                }
                _ => {}
            }
            if c.install.is_empty() {
                problems.push(format!("{at}: install nothing?"));
            }
            for inst in &c.install {
                if !inst.to.starts_with('/') || inst.to.contains("..") {
                    problems.push(format!("{at}: install to '{}' must be an absolute path without '..'", inst.to));
                }
                if inst.roles.is_empty() {
                    problems.push(format!("{at}: install to {} has no roles", inst.to));
                }
                if inst.from.is_some() != c.is_archive() {
                    problems.push(format!("{at}: 'from' is for archives (.tar.gz, .tgz) and required there"));
                }
                for r in &inst.roles {
                    if !targets.insert((inst.to.clone(), *r)) && !inst.to.ends_with('/') {
                        problems.push(format!("{at}: {} is installed twice for {r}", inst.to));
                    }
                }
            }
        }
        if problems.is_empty() { Ok(def) } else { Err(invalid(problems.join("; "))) }
    }

    /// The Kubernetes version the image carries.
    pub fn kube_version(&self) -> KubeVersion {
        self.kubernetes.parse().expect("checked by parse")
    }

    /// `deb` source lines for the mirror, signed by `keyring`.
    pub fn sources(&self, keyring: &Path) -> Vec<String> {
        std::iter::once(&self.base.suite)
            .chain(&self.base.extra_suites)
            .map(|suite| {
                format!(
                    "deb [signed-by={}] {} {suite} {}",
                    keyring.display(),
                    self.base.mirror,
                    self.base.components.join(" ")
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn shipped_definitions_parse_and_are_pinned() {
        for name in ["debian-12", "ubuntu-24.04"] {
            let path = root().join(format!("images/{name}.toml"));
            let (d, _) = Definition::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(d.name, name);
            for role in [Role::Master, Role::Worker] {
                let installed: Vec<&str> = d
                    .components
                    .iter()
                    .flat_map(|c| &c.install)
                    .filter(|i| i.roles.contains(&role))
                    .map(|i| i.to.as_str())
                    .collect();
                for want in ["/usr/bin/kubelet", "/usr/bin/kube-proxy"] {
                    assert!(installed.contains(&want), "{name} {role} lacks {want}");
                }
                if role == Role::Master {
                    for want in [
                        "/usr/bin/kube-apiserver",
                        "/usr/bin/kube-controller-manager",
                        "/usr/bin/kube-scheduler",
                        "/usr/bin/kubectl",
                    ] {
                        assert!(installed.contains(&want), "{name} master lacks {want}");
                    }
                }
            }
            assert!(d.components.iter().all(|c| c.sha256.is_some() || c.sha512.is_some()));
        }
        let (u, _) = Definition::load(&root().join("images/ubuntu-24.04.toml")).unwrap();
        assert!(u.base.mirror.starts_with("https://snapshot.ubuntu.com/ubuntu/"));
        assert!(u.components.iter().any(|c| c.name == "etcd") && u.components.iter().any(|c| c.name == "containerd"));
    }

    #[test]
    fn problems_are_named() {
        let base = std::fs::read_to_string(root().join("images/debian-12.toml")).unwrap();
        let cases = [
            (
                "unpinned",
                base.replacen("sha256 = \"8ce4f15c67398f6de88c15be47ae388bbcafa23aca423427d11de25f454cff3e\"\n", "", 1),
                "kubelet): not pinned",
            ),
            (
                "relative install",
                base.replacen("to = \"/usr/bin/kubelet\"", "to = \"usr/bin/kubelet\"", 1),
                "must be an absolute path",
            ),
            ("unknown key", base.replacen("[base]", "[base]\nflavour = \"x\"", 1), "unknown field `flavour`"),
            (
                "bad name",
                base.replacen("name = \"debian-12\"", "name = \"Debian_12\"", 1),
                "name 'Debian_12' must be an RFC 1123 subdomain",
            ),
            (
                "bad role",
                base.replacen("roles = [\"master\"] }]", "roles = [\"boss\"] }]", 1),
                "unknown variant `boss`",
            ),
        ];
        for (name, text, want) in cases {
            let e = Definition::parse(&text, Path::new("images/x.toml")).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("images/x.toml"), "{name}: {e}");
        }
    }
}
