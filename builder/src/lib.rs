//! imgbuild: from a cluster manifest to bootable per-role images, first-boot payloads and the
//! enrollment server that nodes talk to.

pub mod cli;
pub mod cluster;
pub mod commands;
pub mod digest;
pub mod image;
pub mod kube;
pub mod payload;
pub mod pki;
pub mod progress;
pub mod pxe;
pub mod serve;
pub mod state;
pub mod templates;
pub mod tokens;
pub mod tools;
