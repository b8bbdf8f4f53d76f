//! Simulated machines speaking the enrollment protocol directly (tests and the benchmark): each
//! machine has its own client, as a fleet of real machines would: it enrolls on a new TLS
//! connection and goes on using it (the server binds it to the node); any later connection
//! presents the certificate it got.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use firstboot::agent::client::{Backoff, CallError, Client};
use proto::BootstrapToken;
use proto::pin::CaPin;
use proto::wire::*;

pub struct Sim {
    pub servers: Vec<String>,
    pub pin: CaPin,
    pub token: Option<BootstrapToken>,
    pub deadline: Duration,
}

pub fn mac(i: usize) -> String {
    let b = (i as u32).to_be_bytes();
    format!("52:54:01:{:02x}:{:02x}:{:02x}", b[1], b[2], b[3])
}

/// A machine's enrollment key, made before it talks to the server (its CSR is made on the
/// connection it goes on: it carries that connection's channel binding).
pub struct Prepared {
    pub key: rcgen::KeyPair,
}

impl Prepared {
    pub fn new() -> Self {
        Prepared { key: rcgen::KeyPair::generate().unwrap() }
    }
}

impl Default for Prepared {
    fn default() -> Self {
        Self::new()
    }
}

/// A machine that enrolled.
pub struct Enrolled {
    pub node: String,
    pub client: Client,
}

impl Sim {
    fn client(&self, identity: Option<(&str, &str)>) -> Client {
        let mut c = Client::new(&self.servers, self.pin, identity, Instant::now() + self.deadline).unwrap();
        c.backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(500) };
        c
    }

    /// Enrolls a machine with this identity.
    pub async fn enroll(&self, identity: MachineIdentity) -> Result<Enrolled, CallError> {
        self.enroll_prepared(identity, Prepared::new()).await
    }

    pub async fn enroll_prepared(&self, identity: MachineIdentity, p: Prepared) -> Result<Enrolled, CallError> {
        let client = self.client(None);
        let resp: EnrollResponse = client
            .post_bound(PATH_ENROLL, |binding| {
                Ok(EnrollRequest {
                    protocol: PROTOCOL_VERSION,
                    token: self.token.clone(),
                    identity: identity.clone(),
                    image: None,
                    csr: firstboot::agent::csr(&p.key, Some(binding)).map_err(|e| e.to_string())?,
                })
            })
            .await?;
        let cert = resp.client_cert.expect("enrolled");
        let node = resp.node.expect("enrolled").name;
        client.present(&cert, &p.key.serialize_pem()).unwrap();
        Ok(Enrolled { node, client })
    }
}

impl Enrolled {
    pub async fn config(&self) -> Result<NodeConfig, CallError> {
        self.client.get(PATH_CONFIG).await
    }

    /// Signs a CSR for a new key for each requested purpose.
    pub async fn sign(&self, purposes: &[CertPurpose]) -> Result<SignResponse, CallError> {
        let csrs = purposes
            .iter()
            .map(|p| CsrRequest {
                purpose: *p,
                csr: firstboot::agent::csr(&rcgen::KeyPair::generate().unwrap(), None).unwrap(),
            })
            .collect();
        self.client.post(PATH_SIGN, &SignRequest { csrs }).await
    }

    pub async fn report(&self, phase: Phase, message: &str) -> Result<(), CallError> {
        let now = time::OffsetDateTime::now_utc();
        let r = Report {
            phase,
            status: PhaseStatus::Succeeded,
            message: message.to_string(),
            code: None,
            started_at: now,
            at: now,
            boot_id: None,
        };
        self.client.post::<_, serde_json::Value>(PATH_REPORT, &r).await.map(|_| ())
    }
}
