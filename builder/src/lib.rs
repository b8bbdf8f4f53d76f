//! imgbuild: from a cluster manifest to bootable per-role images, first-boot payloads and the
//! enrollment server that nodes talk to.

pub mod cluster;
pub mod pki;
