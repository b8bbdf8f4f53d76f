//! Who an enrollment certificate speaks for, and `POST /v1/sign`: certificates for the keys a node
//! made, one per purpose, each exactly what [`crate::pki::leaf_spec`] says that node may have.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proto::wire::{CertPurpose, ErrorCode, IssuedCert, SignRequest, SignResponse};

use super::records::{self, NodeRecord, StoredCert};
use super::{ApiError, Fleet};
use crate::pki::{self, Csr};

impl Fleet {
    /// The node a client certificate speaks for: CN names it, and the certified key must be the
    /// one it is bound to (a certificate of a reset node no longer works), and the node must not
    /// be revoked. Read on every request, so a revocation takes effect at the next one.
    pub async fn authenticate(&self, cn: &str, spki_der: &[u8]) -> Result<NodeRecord, ApiError> {
        match self.record::<NodeRecord>(&records::node_key(cn)).await? {
            Some(n) if n.client.spki != crate::digest::sha256_hex(spki_der) => Err(ApiError::new(
                ErrorCode::NotEnrolled,
                format!("this client certificate for {cn} is not the one its node is bound to"),
            )),
            Some(n) if n.revoked.is_some() => {
                Err(ApiError::new(ErrorCode::Revoked, format!("the enrollment of {cn} was revoked by the operator")))
            }
            Some(n) => Ok(n),
            None => Err(ApiError::new(ErrorCode::NotEnrolled, format!("no node {cn} is enrolled"))),
        }
    }

    /// `POST /v1/sign`. The same key asked again gets the same certificate.
    pub async fn sign(&self, name: &str, req: SignRequest, source: IpAddr) -> Result<SignResponse, ApiError> {
        let key = records::node_key(name);
        // Verified once, outside the transaction: a retry must not pay for the signatures again.
        let mut csrs = Vec::with_capacity(req.csrs.len());
        for item in &req.csrs {
            let csr = Csr::verify(&item.csr, None)
                .map_err(|e| self.refused_csr(name, item.purpose, source, e.to_string()))?;
            csrs.push((item.purpose, csr));
        }
        let (key, csrs) = (&key, &csrs);
        let (response, signed) = self
            .transact(txn!(|tx| {
                let mut node: NodeRecord = tx
                    .get(key)
                    .await?
                    .ok_or_else(|| ApiError::new(ErrorCode::NotEnrolled, format!("no node {name}")))?;
                let ident = node.identity();
                let mut issued = BTreeMap::new();
                let mut out = Vec::with_capacity(csrs.len());
                for (purpose, csr) in csrs {
                    let spec = pki::leaf_spec(*purpose, &self.cluster, &ident).ok_or_else(|| {
                        self.refused_csr(
                            name,
                            *purpose,
                            source,
                            format!("{purpose} certificates are not issued to {} nodes", node.role),
                        )
                    })?;
                    let ca = self.cas.get(spec.ca);
                    let spki = crate::digest::sha256_hex(csr.spki());
                    let cert = match node.certs.get(purpose) {
                        Some(stored) if stored.spki == spki => stored.cert.clone(),
                        _ => {
                            let cert = ca
                                .sign(&spec, csr, self.cluster.pki.cert_validity)
                                .map_err(|e| self.refused_csr(name, *purpose, source, e.to_string()))?;
                            issued.insert(*purpose, StoredCert { spki, cert: cert.clone() });
                            cert
                        }
                    };
                    out.push(IssuedCert { purpose: *purpose, cert, ca: ca.cert_pem.clone() });
                }
                let signed = issued.len() as u64;
                if signed > 0 {
                    for p in issued.keys() {
                        tx.audit("signed", &[("node", name), ("purpose", p.as_str()), ("source", &source.to_string())]);
                    }
                    node.certs.extend(issued);
                    tx.put(key, &node);
                }
                Ok((SignResponse { certs: out }, signed))
            }))
            .await?;
        self.metrics.signed(signed);
        Ok(response)
    }

    fn refused_csr(&self, name: &str, purpose: CertPurpose, source: IpAddr, reason: String) -> ApiError {
        let e = ApiError::new(ErrorCode::CsrRefused, reason);
        self.refuse("sign", source, &format!("{name}/{purpose}"), e, "")
    }
}
