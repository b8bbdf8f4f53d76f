//! firstboot: the program every node runs once at first boot, and the definitions it shares with
//! `imgbuild`.
//!
//! Without the `agent` feature this crate is only what both sides of the enrollment protocol need,
//! defined once: the wire types ([`proto`]), the first-boot payload ([`bootcfg`]), bootstrap tokens
//! ([`token`]), CA pins and the bootstrap-signer JWS ([`pin`]), node roles ([`role`]) and on-node
//! paths ([`paths`]). `imgbuild` depends on it that way. The `agent` feature adds the node side.

pub mod bootcfg;
pub mod fsutil;
pub mod paths;
pub mod pin;
pub mod proto;
pub mod role;
pub mod tls;
pub mod token;

#[cfg(feature = "agent")]
pub mod agent;

pub use role::Role;
pub use token::BootstrapToken;
