//! Embeds manifests/templates/ (rendered for machines) and manifests/image/ (copied into every
//! image, with their modes), so that what ships lives as files in the tree and the imgbuild
//! binary stays self-contained.

// A build script fails by panicking: cargo shows the message and stops the build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write;
use std::path::Path;

/// (path relative to `base`, absolute path, mode) of every file under `dir`.
fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, String, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("manifests/templates").map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, base, out);
        } else {
            let name = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            out.push((name, p.canonicalize().unwrap().to_string_lossy().into_owned(), mode));
        }
    }
}

/// Embeds `manifests/<dir>` as a static slice `name` of (path, contents[, mode]).
fn embed(dir: &str, name: &str, with_mode: bool) -> String {
    // Read when the script runs, not when it was compiled: a target directory shared between
    // checkouts reuses the compiled script.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir).join("../manifests").join(dir);
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    let ty = if with_mode { "(&str, &str, u32)" } else { "(&str, &str)" };
    let mut code = format!("pub static {name}: &[{ty}] = &[\n");
    for (rel, path, mode) in &files {
        println!("cargo:rerun-if-changed={path}");
        if with_mode {
            writeln!(code, "    ({rel:?}, include_str!({path:?}), 0o{mode:o}),").unwrap();
        } else {
            writeln!(code, "    ({rel:?}, include_str!({path:?})),").unwrap();
        }
    }
    code.push_str("];\n");
    code
}

fn main() {
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).to_path_buf();
    std::fs::write(out.join("templates.rs"), embed("templates", "TEMPLATES", false)).unwrap();
    std::fs::write(out.join("image_files.rs"), embed("image", "IMAGE_FILES", true)).unwrap();
}
