//! firstboot: the program every node runs once at first boot: identify, enroll with `imgbuild
//! serve`, fetch its role config and certificates, apply them, start services, join, and report
//! every phase. What it shares with `imgbuild` (wire types, payload, tokens, pins, paths) is the
//! `proto` crate.

pub mod agent;
