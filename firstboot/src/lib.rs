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

/// An error with its sources on one line (reqwest's and rustls' reasons sit a few levels down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
