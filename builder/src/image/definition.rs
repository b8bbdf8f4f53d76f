//! Image definitions (`images/<name>.toml`): the base (suite, mirror, archive keyring), the
//! packages per role, and components pinned by digest, from a URL or a local file. Parsed with
//! unknown keys refused, then checked: every component pinned, every install path absolute,
//! every role known.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proto::Role;
use serde::Deserialize;

use crate::cluster::KubeVersion;

/// An image definition, checked: what every role's image is made from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Definition {
    /// The definition's name (`debian-12`): an RFC 1123 subdomain, in image and file names.
    pub name: String,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// The Kubernetes version the components carry.
    pub kubernetes: String,
    /// The distribution, mirror and archive keyring the base tree comes from.
    pub base: Base,
    /// The Debian packages each role installs.
    pub packages: Packages,
    /// Pinned files installed into the images; after parsing, also one per `[[image]]` (an OCI
    /// archive is a component with [`Component::oci`] set).
    #[serde(default, rename = "component")]
    pub components: Vec<Component>,
    /// The OCI images the roles carry, as written (`[[image]]`).
    #[serde(default, rename = "image")]
    pub images: Vec<OciImage>,
}

/// `[base]`: where the packages come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Base {
    /// `debian` or `ubuntu`.
    pub distribution: String,
    /// The suite (`bookworm`, `noble`).
    pub suite: String,
    /// More suites from the same mirror (`noble-updates`).
    #[serde(default)]
    pub extra_suites: Vec<String>,
    /// The archive mirror's URL.
    pub mirror: String,
    /// Archive components (`main`, `universe`).
    pub components: Vec<String>,
    /// The archive keyring the signed index is verified with.
    pub keyring: Keyring,
}

/// `base.keyring`: the archive key, pinned by sha256.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Keyring {
    /// The keyring file (on this machine, or inside `package`).
    pub path: String,
    /// sha256 of the keyring file (64 lowercase hex digits).
    pub sha256: String,
    /// Where the keyring comes from when this machine does not have it: a Debian package, and
    /// `"MIRROR SUITE"` to get it from.
    #[serde(default)]
    pub package: Option<String>,
    /// `"MIRROR SUITE"` to download `package` from.
    #[serde(default)]
    pub from: Option<String>,
}

/// `[packages]`: Debian packages per role, on top of the base system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Packages {
    /// Every role's.
    #[serde(default)]
    pub all: Vec<String>,
    /// Masters' only.
    #[serde(default)]
    pub master: Vec<String>,
    /// Workers' only.
    #[serde(default)]
    pub worker: Vec<String>,
    /// Dedicated etcd members' only; an etcd image is made when this or a component names etcd.
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

/// `[[component]]`: a file from outside the archive (binaries, archives), pinned by digest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Component {
    /// Unique name, used in the lock.
    pub name: String,
    /// Its version, for the image manifest and SBOM.
    pub version: String,
    /// Where to download it (one of `url` and `file`).
    #[serde(default)]
    pub url: Option<String>,
    /// The file on this machine, an absolute path (one of `url` and `file`).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// sha256 of the file, as upstream publishes it.
    #[serde(default)]
    pub sha256: Option<String>,
    /// sha512 of the file, for upstreams that publish only that.
    #[serde(default)]
    pub sha512: Option<String>,
    /// Where it goes in which roles' images.
    pub install: Vec<Install>,
    /// Set for the component made from an `[[image]]`: the archive is installed as it is (never
    /// unpacked) and imported into containerd on the node.
    #[serde(skip)]
    pub oci: Option<OciRef>,
}

/// An OCI image a definition's roles carry (`[[image]]`): an OCI image layout in a tar archive
/// (what `ctr images import` reads), pinned by its manifest digest and, for a `url` or `file`,
/// by the archive's bytes. With neither, the image is pulled from its registry by the digest
/// (see [`super::registry`]) and the lock pins the archive made from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OciImage {
    /// `REPOSITORY:TAG`, the name containerd and pod specs use (e.g. `imgbuild.local/pause:3.4`).
    pub reference: String,
    /// `sha256:…` of the image manifest the archive's index names for TAG, or, for an image
    /// pulled from its registry, the digest its upstream publishes (an index or a manifest).
    pub digest: String,
    /// Where the archive is downloaded from (at most one of `url` and `file`; neither: the
    /// reference's registry).
    #[serde(default)]
    pub url: Option<String>,
    /// The archive on this machine, an absolute path (e.g. made by images/local/build-oci-images).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// sha256 of the archive file (with `url` or `file`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// The roles whose images carry it.
    pub roles: Vec<Role>,
    /// containerd's sandbox (pause) image on the roles that carry it; at most one per role.
    #[serde(default)]
    pub sandbox: bool,
}

/// What a node needs to import an OCI archive and name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `REPOSITORY:TAG`.
    pub reference: String,
    /// The reference's repository (`imgbuild.local/pause`), what `ctr images import --base-name` takes.
    pub repository: String,
    /// The reference's tag, which the archive's index names (`org.opencontainers.image.ref.name`).
    pub tag: String,
    /// `sha256:…` of the manifest.
    pub digest: String,
    /// containerd's sandbox image.
    pub sandbox: bool,
}

impl OciRef {
    /// The archive's path on the node.
    pub fn archive_path(&self) -> String {
        format!("{}/{}-{}.oci.tar", proto::paths::IMAGE_ARCHIVES, self.name(), self.tag)
    }

    /// The repository's last path component (`pause` of `registry.k8s.io/pause`).
    pub fn name(&self) -> &str {
        self.repository.rsplit('/').next().unwrap_or(&self.repository)
    }
}

/// Splits `REPOSITORY:TAG` as the distribution spec defines them (lowercase path components
/// of `[a-z0-9]` with `.`, `_`, `-` separators, an optional `host[:port]/` first; a tag of up to
/// 128 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`).
pub fn split_reference(reference: &str) -> Option<(&str, &str)> {
    let (repo, tag) = reference.rsplit_once(':')?;
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    let component_ok = |c: &str, first: bool| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b"._-".contains(&b) || (first && b == b':'))
            && c.as_bytes()[0].is_ascii_alphanumeric()
    };
    let repo_ok = !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').enumerate().all(|(i, c)| component_ok(c, i == 0 && repo.contains('/')));
    (tag_ok && repo_ok).then_some((repo, tag))
}

/// Where a component (or a part of its archive) goes, and in which roles' images.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Install {
    /// Inside an archive: a file, or a directory ending in `/` (everything under it).
    #[serde(default)]
    pub from: Option<String>,
    /// Absolute path in the image; a directory when it ends in `/`.
    pub to: String,
    /// The roles whose images get it.
    pub roles: Vec<Role>,
}

impl Component {
    /// An `[[image]]` with neither `url` nor `file`: pulled from its registry by digest.
    pub fn from_registry(&self) -> bool {
        self.oci.is_some() && self.url.is_none() && self.file.is_none()
    }

    /// Whether the source is a tar archive (by its name).
    pub fn is_archive(&self) -> bool {
        if self.oci.is_some() {
            return false;
        }
        let name = self.url.clone().or_else(|| self.file.as_ref().map(|f| f.display().to_string())).unwrap_or_default();
        name.ends_with(".tar.gz") || name.ends_with(".tgz") || name.ends_with(".tar")
    }

    /// Its URL, its file's path, or `REPOSITORY@DIGEST` for an image from its registry.
    pub fn source(&self) -> String {
        match (&self.url, &self.file, &self.oci) {
            (Some(u), _, _) => u.clone(),
            (None, Some(f), _) => f.display().to_string(),
            (None, None, Some(o)) => format!("{}@{}", o.repository, o.digest),
            (None, None, None) => String::new(),
        }
    }

    /// Whether `role`'s image installs it.
    pub fn for_role(&self, role: Role) -> bool {
        self.install.iter().any(|i| i.roles.contains(&role))
    }
}

/// Why an image definition cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The file cannot be read.
    #[error("cannot read image definition {path}")]
    Read {
        /// The definition file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse, or breaks a rule (every problem, joined with `; `).
    #[error("{path}: {message}")]
    Invalid {
        /// The definition file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

pub(crate) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Definition {
    /// Reads and checks the definition at `path`; returns it with its text (the lock pins the text).
    pub fn load(path: &Path) -> Result<(Definition, String), DefinitionError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| DefinitionError::Read { path: path.to_path_buf(), source })?;
        let def = Definition::parse(&text, path)?;
        Ok((def, text))
    }

    /// Parses and checks definition text; `path` names it in errors. `[[image]]`s become components.
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
        let mut def = def;
        let mut sandboxes = BTreeSet::new();
        // (index in `[[image]]`, component): an image whose reference does not parse is skipped.
        let mut images = Vec::new();
        for (i, img) in def.images.iter().enumerate() {
            let at = format!("image[{i}] ({})", img.reference);
            let Some((repository, tag)) = split_reference(&img.reference) else {
                problems.push(format!(
                    "{at}: reference must be REPOSITORY:TAG (lowercase repository path, tag of [A-Za-z0-9_.-]), e.g. imgbuild.local/pause:3.4"
                ));
                continue;
            };
            if !img.digest.strip_prefix("sha256:").is_some_and(|h| is_hex(h, 64)) {
                problems.push(format!("{at}: digest must be sha256: and 64 lowercase hex digits (the manifest's)"));
            }
            if img.sandbox {
                for r in &img.roles {
                    if !sandboxes.insert(*r) {
                        problems.push(format!("{at}: a second sandbox image for {r}"));
                    }
                }
            }
            let oci = OciRef {
                reference: img.reference.clone(),
                repository: repository.to_string(),
                tag: tag.to_string(),
                digest: img.digest.clone(),
                sandbox: img.sandbox,
            };
            let component = Component {
                name: img.reference.clone(),
                version: tag.to_string(),
                url: img.url.clone(),
                file: img.file.clone(),
                sha256: img.sha256.clone(),
                sha512: None,
                install: vec![Install { from: None, to: oci.archive_path(), roles: img.roles.clone() }],
                oci: Some(oci),
            };
            images.push((i, component));
        }
        // From here on an image is a component: the checks below are for both.
        let files = def.components.len();
        let image_index: Vec<usize> = images.iter().map(|(i, _)| *i).collect();
        def.components.extend(images.into_iter().map(|(_, c)| c));
        let mut names = BTreeSet::new();
        let mut targets = BTreeSet::new();
        for (i, c) in def.components.iter().enumerate() {
            let at = match c.oci {
                Some(_) => format!("image[{}] ({})", image_index[i - files], c.name),
                None => format!("component[{i}] ({})", c.name),
            };
            if !names.insert(c.name.clone()) {
                problems.push(format!("{at}: a second image or component with this name"));
            }
            match (&c.url, &c.file) {
                (Some(u), None) if u.starts_with("https://") || u.starts_with("http://") => {}
                (Some(u), None) => problems.push(format!("{at}: url '{u}' must be http(s)")),
                (None, Some(f)) if f.is_absolute() => {}
                (None, Some(f)) => problems.push(format!("{at}: file '{}' must be an absolute path", f.display())),
                // An [[image]] with neither comes from its registry, pinned by its digest.
                (None, None) if c.from_registry() => {}
                (Some(_), Some(_)) if c.oci.is_some() => {
                    problems.push(format!("{at}: give at most one of url and file (neither: pulled from its registry)"))
                }
                _ => problems.push(format!("{at}: give exactly one of url and file")),
            }
            match (&c.sha256, &c.sha512) {
                (Some(_), _) if c.from_registry() => problems.push(format!(
                    "{at}: sha256 pins an archive's bytes (with url or file); an image from its registry is pinned by its digest alone"
                )),
                (None, None) if c.from_registry() => {}
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
            // Pinned: by the bytes' digest, or (images from a registry) by the published digest.
            assert!(d.components.iter().all(|c| c.sha256.is_some() || c.sha512.is_some() || c.from_registry()));
        }
        let (u, _) = Definition::load(&root().join("images/ubuntu-24.04.toml")).unwrap();
        assert!(u.base.mirror.starts_with("https://snapshot.ubuntu.com/ubuntu/"));
        assert!(u.components.iter().any(|c| c.name == "etcd") && u.components.iter().any(|c| c.name == "containerd"));
        // Production pins pause (the sandbox) and CoreDNS by digest, pulled from their registry.
        let pulled: Vec<_> = u.components.iter().filter(|c| c.from_registry()).filter_map(|c| c.oci.as_ref()).collect();
        assert!(pulled.iter().any(|o| o.repository == "registry.k8s.io/pause" && o.sandbox));
        assert!(pulled.iter().any(|o| o.repository == "registry.k8s.io/coredns/coredns"));
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
            (
                "image reference without a tag",
                base.replacen(
                    "reference = \"imgbuild.local/busybox:1.35.0\"",
                    "reference = \"imgbuild.local/busybox\"",
                    1,
                ),
                "image[1] (imgbuild.local/busybox): reference must be REPOSITORY:TAG",
            ),
            (
                "image digest not sha256",
                base.replacen("digest = \"sha256:0917", "digest = \"md5:0917", 1),
                "image[1] (imgbuild.local/busybox:1.35.0): digest must be sha256:",
            ),
            (
                "two sandbox images",
                // The last [[image]] (busybox) made a sandbox image too.
                base.clone() + "sandbox = true\n",
                "a second sandbox image for master",
            ),
            (
                "registry image with a sha256",
                base.clone().replacen("file = \"/var/cache/imgbuild/oci/busybox-1.35.0.oci.tar\"\n", "", 1),
                "image[1] (imgbuild.local/busybox:1.35.0): sha256 pins an archive's bytes (with url or file)",
            ),
            (
                "image with url and file",
                base.clone().replacen(
                    "file = \"/var/cache/imgbuild/oci/busybox-1.35.0.oci.tar\"\n",
                    "file = \"/var/cache/imgbuild/oci/busybox-1.35.0.oci.tar\"\nurl = \"https://example.org/b.tar\"\n",
                    1,
                ),
                "give at most one of url and file",
            ),
            (
                "image with no roles",
                base.replacen("roles = [\"master\", \"worker\"]\nsandbox = true", "roles = []\nsandbox = true", 1),
                "image[0] (imgbuild.local/pause:3.4-v1.20.2): install to /usr/lib/imgbuild/images/pause-3.4-v1.20.2.oci.tar has no roles",
            ),
        ];
        for (name, text, want) in cases {
            let e = Definition::parse(&text, Path::new("images/x.toml")).unwrap_err().to_string();
            assert!(e.contains(want) && e.starts_with("images/x.toml"), "{name}: {e}");
        }
    }

    #[test]
    fn references() {
        for (r, want) in [
            ("imgbuild.local/pause:3.4-v1.20.2", Some(("imgbuild.local/pause", "3.4-v1.20.2"))),
            ("registry.k8s.io/pause:3.10", Some(("registry.k8s.io/pause", "3.10"))),
            ("localhost:5000/a/b:v1", Some(("localhost:5000/a/b", "v1"))),
            ("busybox:1.35.0", Some(("busybox", "1.35.0"))),
            ("Busybox:1", None),
            ("busybox", None),
            ("busybox:", None),
            ("busybox:-x", None),
            ("a//b:1", None),
            ("pause@sha256:00", None),
        ] {
            assert_eq!(split_reference(r), want, "{r}");
        }
    }
}
