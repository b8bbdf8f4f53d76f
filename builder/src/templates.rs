//! Templates for everything imgbuild renders for machines (units, configs, kubeconfigs), kept as
//! files under `manifests/templates/` and embedded at build time. Rendering is strict: a variable
//! the template uses but the context lacks is an error, not an empty string.

use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/templates.rs"));
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        for (name, source) in embedded::TEMPLATES {
            env.add_template(name, source).unwrap_or_else(|e| panic!("template {name}: {e:#}"));
        }
        env
    })
}

/// Renders `name` (a path under manifests/templates/) with `ctx`.
pub fn render(name: &str, ctx: impl Serialize) -> Result<String, minijinja::Error> {
    env().get_template(name)?.render(ctx)
}

/// The text of an embedded template, as written.
pub fn source(name: &str) -> Option<&'static str> {
    embedded::TEMPLATES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The names of all embedded templates.
pub fn names() -> impl Iterator<Item = &'static str> {
    embedded::TEMPLATES.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn all_templates_compile() {
        for name in super::names() {
            super::env().get_template(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }
}
