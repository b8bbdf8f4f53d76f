//! What `imgbuild` and `firstboot` share, defined once: the enrollment API ([`wire`]: paths,
//! request and response types, error codes), the first-boot payload ([`bootcfg`]), bootstrap
//! tokens ([`token`]), CA pins and the bootstrap-signer JWS ([`pin`]), node roles ([`role`]),
//! the paths of a node's files ([`paths`]), the TLS client configuration both sides' clients use
//! ([`tls`]) and atomic file writes ([`fsutil`]).
//!
//! Neither binary's logic lives here: only what both sides must agree on.

pub mod bootcfg;
pub mod fsutil;
pub mod paths;
pub mod pin;
pub mod role;
pub mod tls;
pub mod token;
pub mod wire;

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
