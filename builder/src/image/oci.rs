//! OCI images a role carries (`[[image]]` in a definition): each archive's manifest digest is
//! checked against the definition before it goes into an image, and the image gets a list that
//! `imgbuild-images.service` imports into containerd's `k8s.io` namespace before kubelet starts
//! (manifests/image/usr/lib/imgbuild/import-images).
//!
//! The archive is an OCI image layout as a tar (`oci-layout`, `index.json`, `blobs/`), read here
//! with the `tar` crate and parsed with serde: only the index is looked at, since containerd
//! verifies every blob by its digest when it imports them. An archive pulled from a registry
//! names the platform's manifest and records the pinned index digest beside it
//! ([`super::registry::INDEX_DIGEST`]); the lock pins its bytes.

use std::path::{Path, PathBuf};

use proto::Role;
use serde::Deserialize;

use super::definition::{Definition, OciRef};

/// The annotation an OCI index puts a manifest's tag in.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An archive that is not what its `[[image]]` says.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// Not a tar, or no readable `index.json` in it.
    #[error("{}: not an OCI image archive ({reason})", path.display())]
    NotOci {
        /// The archive.
        path: PathBuf,
        /// Why it is not one.
        reason: String,
    },
    /// The index names no manifest with the definition's tag.
    #[error("{}: its index.json names no manifest '{tag}' (it names: {found}); the definition's reference is {reference}", path.display())]
    NoTag {
        /// The archive.
        path: PathBuf,
        /// The tag looked for.
        tag: String,
        /// The definition's reference.
        reference: String,
        /// The tags the index names (`none` if none).
        found: String,
    },
    /// The tag's manifest has another digest than the one pinned.
    #[error("{}: manifest '{tag}' is {actual}, the definition pins {expected} for {reference}", path.display())]
    Digest {
        /// The archive.
        path: PathBuf,
        /// The tag.
        tag: String,
        /// The definition's reference.
        reference: String,
        /// The pinned manifest digest.
        expected: String,
        /// The digest the index names.
        actual: String,
    },
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// Checks that `archive`'s index names `oci.tag` with the pinned digest (that of its manifest, or
/// of the index it was pulled by); returns the manifest's digest, which containerd will show.
pub fn verify(archive: &Path, oci: &OciRef) -> Result<String, OciError> {
    let not_oci = |reason: String| OciError::NotOci { path: archive.to_path_buf(), reason };
    let file = std::fs::File::open(archive).map_err(|e| not_oci(e.to_string()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut index = None;
    for entry in tar.entries().map_err(|e| not_oci(e.to_string()))? {
        let mut entry = entry.map_err(|e| not_oci(e.to_string()))?;
        let path = entry.path().map_err(|e| not_oci(e.to_string()))?;
        if path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .eq([std::path::Component::Normal("index.json".as_ref())])
        {
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut text).map_err(|e| not_oci(e.to_string()))?;
            index = Some(serde_json::from_slice::<Index>(&text).map_err(|e| not_oci(format!("index.json: {e}")))?);
            break;
        }
    }
    let index = index.ok_or_else(|| not_oci("no index.json".into()))?;
    let Some(m) = index.manifests.iter().find(|m| m.annotations.get(REF_NAME) == Some(&oci.tag)) else {
        let found = index.manifests.iter().filter_map(|m| m.annotations.get(REF_NAME).cloned()).collect::<Vec<_>>();
        return Err(OciError::NoTag {
            path: archive.to_path_buf(),
            tag: oci.tag.clone(),
            reference: oci.reference.clone(),
            found: if found.is_empty() { "none".into() } else { found.join(", ") },
        });
    };
    let pulled_by = m.annotations.get(super::registry::INDEX_DIGEST);
    if m.digest != oci.digest && pulled_by != Some(&oci.digest) {
        return Err(OciError::Digest {
            path: archive.to_path_buf(),
            tag: oci.tag.clone(),
            reference: oci.reference.clone(),
            expected: oci.digest.clone(),
            actual: pulled_by.unwrap_or(&m.digest).clone(),
        });
    }
    Ok(m.digest.clone())
}

/// The images `role` carries, in definition order.
pub fn for_role(def: &Definition, role: Role) -> impl Iterator<Item = &OciRef> {
    def.components.iter().filter(move |c| c.for_role(role)).filter_map(|c| c.oci.as_ref())
}

/// One line of the node's list ([`proto::paths::IMAGE_LIST`]): `ARCHIVE REPOSITORY TAG DIGEST`,
/// DIGEST being the manifest's that [`verify`] returned (what `ctr images ls` shows after the
/// import).
pub fn list_line(oci: &OciRef, manifest: &str) -> String {
    format!("{} {} {} {manifest}\n", oci.archive_path(), oci.repository, oci.tag)
}

/// What the role's images are, for cache keys: each one's line with its pinned digest.
pub fn pinned(def: &Definition, role: Role) -> String {
    for_role(def, role).map(|o| list_line(o, &o.digest)).collect()
}

/// The sandbox image of `role`, if the definition gives one.
pub fn sandbox(def: &Definition, role: Role) -> Option<String> {
    for_role(def, role).find(|o| o.sandbox).map(|o| o.reference.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, index: &str) -> PathBuf {
        let path = dir.join("x.oci.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in [("oci-layout", r#"{"imageLayoutVersion":"1.0.0"}"#), ("index.json", index)] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_bytes()).unwrap();
        }
        b.finish().unwrap();
        path
    }

    fn oci(tag: &str, digest: &str) -> OciRef {
        OciRef {
            reference: format!("imgbuild.local/pause:{tag}"),
            repository: "imgbuild.local/pause".into(),
            tag: tag.into(),
            digest: digest.into(),
            sandbox: true,
        }
    }

    #[test]
    fn verify_cases() {
        let dir = tempfile::tempdir().unwrap();
        let d = format!("sha256:{}", "a".repeat(64));
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":1,"annotations":{{"{REF_NAME}":"3.4"}}}}]}}"#
        );
        let good = archive(dir.path(), &index);
        verify(&good, &oci("3.4", &d)).unwrap();
        let cases = [
            ("other digest", oci("3.4", &format!("sha256:{}", "b".repeat(64))), "the definition pins sha256:bbbb"),
            ("other tag", oci("3.5", &d), "names no manifest '3.5' (it names: 3.4)"),
        ];
        for (name, o, want) in &cases {
            let e = verify(&good, o).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
        }
        let not_tar = dir.path().join("not.tar");
        std::fs::write(&not_tar, b"hello").unwrap();
        assert!(verify(&not_tar, &oci("3.4", &d)).unwrap_err().to_string().contains("not an OCI image archive"));
    }
}
