//! The cluster model: `cluster.yaml` parsed ([`raw`]), then validated into [`Cluster`], whose
//! fields cannot hold invalid values. Validation reports every problem at once, each with its
//! field path, line, value and what would be valid.
//!
//! To add a field: add it to [`raw`], to the typed settings here, to [`Cluster::to_raw`] (the
//! resolved spec written to the state dir), and check it in [`validate`].

mod hosts;
mod locate;
pub(crate) mod raw;
mod types;
mod validate;

use std::fmt;
use std::path::Path;

pub use hosts::{Components, Flags, Hosts, exec_words};
pub use types::*;
pub(crate) use validate::validate;

/// The reference cluster, built into the binary.
pub const DEFAULT_MANIFEST: &str = include_str!("../../../manifests/cluster.yaml");
/// How problems name [`DEFAULT_MANIFEST`], which has no file name.
pub const DEFAULT_MANIFEST_NAME: &str = "<embedded reference cluster>";

/// One thing wrong with a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path, e.g. `spec.nodes[2].mac`.
    pub path: String,
    /// 1-based line in the manifest, when the path can be found in it.
    pub line: Option<usize>,
    /// The offending value as written, when there is one.
    pub value: Option<String>,
    /// What is wrong and what would be valid.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(l) = self.line {
            write!(f, "line {l}: ")?;
        }
        write!(f, "{}", self.path)?;
        if let Some(v) = &self.value {
            write!(f, " = {v:?}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one manifest.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems {
    /// The manifest's file name (or [`DEFAULT_MANIFEST_NAME`]).
    pub file: String,
    /// The problems, by line.
    pub list: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.list.len();
        write!(f, "{}: {n} problem{}", self.file, if n == 1 { "" } else { "s" })?;
        for p in &self.list {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file cannot be read.
    #[error("cannot read cluster manifest {path}")]
    Read {
        /// The manifest's path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse or is not valid.
    #[error(transparent)]
    Invalid(#[from] Problems),
}

impl Cluster {
    /// Parses and validates manifest text; `file` names it in problems.
    pub fn parse(text: &str, file: &str) -> Result<Cluster, Problems> {
        let lines = locate::Lines::of(text);
        let problem_at = |path: String, value: Option<String>, message: String| Problem {
            line: lines.line(&path),
            path,
            value,
            message,
        };
        let mut unknown = Vec::new();
        let parsed: Result<raw::RawCluster, _> = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_ignored::deserialize(de, |p| unknown.push(format_path(&p)))
        });
        let raw = match parsed {
            Ok(raw) => raw,
            Err(e) => {
                let line = e.location().map(|l| l.line() as usize);
                // serde-saphyr's message carries a snippet of the document; keep its first line.
                let msg = e.to_string();
                let msg = msg.lines().next().unwrap_or("invalid YAML").to_string();
                return Err(Problems {
                    file: file.to_string(),
                    list: vec![Problem { path: "(document)".into(), line, value: None, message: msg }],
                });
            }
        };
        let mut list: Vec<Problem> = unknown
            .into_iter()
            .map(|path| problem_at(path, None, "unknown field (check its spelling and indentation)".into()))
            .collect();
        match validate(&raw) {
            Ok(cluster) if list.is_empty() => return Ok(cluster),
            Ok(_) => {}
            Err(found) => list.extend(found.into_iter().map(|(path, value, message)| problem_at(path, value, message))),
        }
        list.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        Err(Problems { file: file.to_string(), list })
    }

    /// Reads a manifest, or the embedded reference cluster when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Cluster, LoadError> {
        match path {
            None => Ok(Cluster::parse(DEFAULT_MANIFEST, DEFAULT_MANIFEST_NAME)?),
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| LoadError::Read { path: p.display().to_string(), source })?;
                Ok(Cluster::parse(&text, &p.display().to_string())?)
            }
        }
    }

    /// The resolved spec, with every default filled in, as YAML.
    pub fn to_yaml(&self) -> String {
        #[expect(
            clippy::expect_used,
            reason = "the raw model is strings, integers, options and lists: YAML can write all of them"
        )]
        let body = serde_saphyr::to_string(&self.to_raw()).expect("the raw cluster model always serializes");
        format!("# Resolved by imgbuild from the cluster manifest; edit the manifest, not this file.\n{body}")
    }
}

fn format_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match p {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", format_path(parent)),
        P::Map { parent, key } => {
            let parent = format_path(parent);
            if parent.is_empty() { key.clone() } else { format!("{parent}.{key}") }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => format_path(parent),
    }
}

#[cfg(test)]
mod tests;
