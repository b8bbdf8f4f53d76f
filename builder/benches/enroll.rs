//! `cargo bench -p imgbuild --bench enroll`: enrollment throughput and latency for 1,000 and
//! 10,000 simulated machines against `imgbuild serve` (release, its own process, embedded store,
//! audit log on). Each machine has its own client and a new TLS connection: it enrolls with the
//! token (its CSR signed), then, on that connection, now its node's, fetches its config and sends
//! two reports, as firstboot does. Keys and CSRs are made before the clock starts: on a real fleet
//! every machine makes its own. Also measures this machine's P-256 and X25519 speed with
//! `openssl speed` and reports how close the run came to the crypto bound. Prints a Markdown
//! section for BENCHMARKS.md.

// A benchmark panics on purpose when its setup fails; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::Role;
use proto::wire::{MachineIdentity, Phase};
use support::sim::{Prepared, Sim, mac};

const CONCURRENCY: usize = 64;

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // Fields after ')' start with state (field 3); utime and stime are fields 14 and 15.
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(14) + field(15)) as f64 / 100.0
}

struct Run {
    n: usize,
    wall: Duration,
    errors: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    server_peak_kib: u64,
    server_cpu: f64,
    client_cpu: f64,
}

fn run(n: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = support::state_with(dir.path(), |t| {
        t.replace("policy: known-only", "policy: auto-worker")
            .replace("podCIDR: 10.30.0.0/16", "podCIDR: 172.16.0.0/12")
            .replace("nodeCIDRMaskSize: 24", "nodeCIDRMaskSize: 26")
    });
    let serve = support::ServeProcess::start(&st.root, "127.0.0.1:0", None);
    let pid = serve.guard.0.id();
    let now = time::OffsetDateTime::now_utc();
    let sim = Arc::new(Sim {
        servers: vec![serve.url.clone()],
        pin: st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin(),
        token: Some(st.tokens().unwrap().enrollment_token(Role::Worker, now).unwrap().token.clone()),
        deadline: Duration::from_secs(120),
    });
    let prepared: Vec<Prepared> = (0..n).map(|_| Prepared::new()).collect();
    let cpu_before = cpu_seconds(pid);
    let client_before = cpu_seconds(std::process::id());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (wall, mut latencies, errors) = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for (i, p) in prepared.into_iter().enumerate() {
            let (sim, sem) = (sim.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await.unwrap();
                let t = Instant::now();
                let e =
                    sim.enroll_prepared(MachineIdentity { uuid: None, serial: None, macs: vec![mac(i)] }, p).await?;
                e.config().await?;
                e.report(Phase::Fetch, "fetched").await?;
                e.report(Phase::Done, "done").await?;
                Ok::<_, firstboot::agent::client::CallError>(t.elapsed())
            }));
        }
        let mut lat = Vec::with_capacity(n);
        let mut errors = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(d) => lat.push(d),
                Err(e) => {
                    if errors < 3 {
                        eprintln!("error: {e}");
                    }
                    errors += 1;
                }
            }
        }
        (start.elapsed(), lat, errors)
    });
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let r = Run {
        n,
        wall,
        errors,
        p50: pct(0.50),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        server_peak_kib: proc_status(pid, "VmHWM:").unwrap_or(0),
        server_cpu: cpu_seconds(pid) - cpu_before,
        client_cpu: cpu_seconds(std::process::id()) - client_before,
    };
    let nodes = serve.nodes();
    assert_eq!(nodes.len(), n - errors, "the server lost machines");
    r
}

/// `openssl speed` on one core: (ECDSA P-256 signs/s, verifies/s, ECDH P-256 ops/s, X25519 ops/s).
fn openssl_speed() -> (f64, f64, f64, f64) {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "3", "ecdsap256", "ecdhp256", "ecdhx25519"])
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let nums = |line: &str| -> Vec<f64> { line.split_whitespace().filter_map(|w| w.parse().ok()).collect() };
    let line = |needle: &str| text.lines().find(|l| l.contains(needle)).map(nums).unwrap_or_default();
    let (ecdsa, ecdh, x25519) = (line("ecdsa (nistp256)"), line("ecdh (nistp256)"), line("ecdh (X25519)"));
    // ecdsa line: bits, sign s, verify s, sign/s, verify/s; ecdh lines: [bits,] op s, op/s
    (ecdsa[ecdsa.len() - 2], ecdsa[ecdsa.len() - 1], ecdh[ecdh.len() - 1], x25519[x25519.len() - 1])
}

fn main() {
    let runs: Vec<Run> = [1_000, 10_000].into_iter().map(run).collect();
    let (sign, verify, ecdh, x25519) = openssl_speed();
    println!(
        "| machines | wall | throughput | errors | p50 | p99 | max | server CPU | clients' CPU | server peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.2} s | {:.0} machines/s | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} s | {:.1} s | {:.0} MiB |",
            r.n,
            r.wall.as_secs_f64(),
            r.n as f64 / r.wall.as_secs_f64(),
            r.errors,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
            r.server_cpu,
            r.client_cpu,
            r.server_peak_kib as f64 / 1024.0
        );
    }
    // Public-key operations per machine (TLS 1.3, X25519 key exchange, P-256 certificates, one
    // connection): the server makes one key exchange, one CertificateVerify signature, one CSR
    // verification and one certificate signature; the client one key exchange and two
    // verifications (the server's certificate and its CertificateVerify).
    let server = 1.0 / x25519 + 2.0 / sign + 1.0 / verify;
    let client = 1.0 / x25519 + 2.0 / verify;
    let big = runs.last().unwrap();
    let measured = big.n as f64 / big.wall.as_secs_f64();
    let bound_both = 2.0 / (server + client);
    let bound_server = 2.0 / server;
    println!();
    println!(
        "`openssl speed ecdsap256 ecdhp256 ecdhx25519`, one core: {sign:.0} signs/s, {verify:.0} verifies/s, \
         {ecdh:.0} P-256 ECDH/s, {x25519:.0} X25519/s."
    );
    println!(
        "Crypto per machine: server {:.0} µs, client {:.0} µs of one core. Bound on 2 cores with the clients on the same \
         machine: {bound_both:.0} machines/s; the server alone on 2 cores: {bound_server:.0} machines/s.",
        server * 1e6,
        client * 1e6
    );
    println!(
        "Measured {measured:.0} machines/s = {:.0}% of the shared-machine bound ({:.0}% of the server-only bound). \
         The server used {:.1} CPU-seconds for {} machines = {:.0} µs each (crypto bound {:.0} µs); the \
         simulated machines {:.0} µs each (crypto bound {:.0} µs).",
        100.0 * measured / bound_both,
        100.0 * measured / bound_server,
        big.server_cpu,
        big.n,
        big.server_cpu / big.n as f64 * 1e6,
        server * 1e6,
        big.client_cpu / big.n as f64 * 1e6,
        client * 1e6
    );
}
