//! `cargo bench -p imgbuild --bench pki`: `imgbuild init` of the reference cluster, and
//! certificate issuance per second. Prints a Markdown section for BENCHMARKS.md.

// A benchmark panics on purpose when its setup fails; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use imgbuild::cluster::{Cluster, DEFAULT_MANIFEST, KeyAlgorithm};
use imgbuild::pki::{self, Ca, CaKind, NodeIdentity};
use proto::wire::CertPurpose;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Runs `f` repeatedly for about `budget`; returns operations per second.
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        f();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let reference = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let mut rsa = reference.clone();
    rsa.pki.key_algorithm = KeyAlgorithm::Rsa2048;
    println!("| operation | result |\n|---|---|");
    for (label, cluster, runs) in [("ECDSA P-256", &reference, 20), ("RSA-2048", &rsa, 5)] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let dir = tempfile::tempdir().unwrap();
            let st = imgbuild::state::State::new(dir.path().join("cluster"));
            let t = Instant::now();
            imgbuild::state::init(&st, cluster, &[]).unwrap();
            times.push(t.elapsed());
        }
        let min = *times.iter().min().unwrap();
        println!(
            "| `imgbuild init`, reference cluster, {label} ({runs} runs, fresh state dir) | median {}, min {} |",
            ms(median(times)),
            ms(min)
        );
        let dir = tempfile::tempdir().unwrap();
        let st = imgbuild::state::State::new(dir.path().join("cluster"));
        imgbuild::state::init(&st, cluster, &[]).unwrap();
        let t = Instant::now();
        imgbuild::state::init(&st, cluster, &[]).unwrap();
        println!("| `imgbuild init` again on a complete state dir, {label} | {} |", ms(t.elapsed()));
    }

    let (ca, _) =
        Ca::generate(CaKind::Cluster, KeyAlgorithm::EcdsaP256, Duration::from_secs(10 * 365 * 86400)).unwrap();
    let year = Duration::from_secs(365 * 86400);
    let m1 = reference.node("k8s-master1").unwrap();
    let node = NodeIdentity { name: m1.name.clone(), role: m1.role, ip: Some(m1.ip()) };
    let spec = pki::leaf_spec(CertPurpose::Apiserver, &reference, &node).unwrap();
    let key = pki::generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let budget = Duration::from_secs(3);
    let issue = rate(budget, || {
        ca.issue(&spec, &key, year).unwrap();
    });
    println!(
        "| certificates issued per second, one core (ECDSA P-256 CA, apiserver cert with 11 SANs, key given) | {issue:.0}/s |"
    );
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let sign = rate(budget, || {
        ca.sign_csr(&spec, &csr, year).unwrap();
    });
    println!(
        "| CSRs checked and signed per second, one core (parse, verify self-signature, policy, issue) | {sign:.0}/s |"
    );
    let with_key = rate(budget, || {
        ca.issue_with_new_key(&spec, KeyAlgorithm::EcdsaP256, year).unwrap();
    });
    println!("| certificates with a new P-256 key per second, one core | {with_key:.0}/s |");
}
