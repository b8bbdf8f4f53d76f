//! The cluster PKI, in kubeadm's layout: cluster CA (`ca.crt`), etcd CA (`etcd/ca.crt`),
//! front-proxy CA (`front-proxy-ca.crt`), the service-account key pair (`sa.key`, `sa.pub`), and
//! our enrollment CA (`enrollment-ca.crt`), which signs only the client certificates nodes use to
//! talk to `imgbuild serve` — the apiserver does not trust it.
//!
//! [`leaf_spec`] is the one place that says what each certificate contains. Certificates for keys
//! a node generated are signed from a verified [`Csr`] by [`Ca::sign`], which takes nothing but
//! the public key from the CSR and refuses CSRs that ask for more than the policy grants.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::Role;
use proto::pin::CaPin;
use proto::wire::CertPurpose;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_RSA_SHA256, PublicKeyData, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::cluster::{Cluster, KeyAlgorithm};

/// Why a CA, key or certificate cannot be loaded, made or issued.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A PKI file cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PKI file does not parse, or a certificate and key do not belong together.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Making a key, a serial number or a signature failed.
    #[error("generating a key or certificate failed: {0}")]
    Crypto(String),
    /// A CSR is not valid or asks for more than the policy grants (what is wrong).
    #[error("CSR refused: {0}")]
    CsrRefused(String),
}

fn crypto(e: impl std::fmt::Display) -> PkiError {
    PkiError::Crypto(e.to_string())
}

/// The four CAs of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaKind {
    /// The cluster CA (`ca.crt`): the apiserver, kubelets and components.
    Cluster,
    /// The etcd CA (`etcd/ca.crt`): etcd members and their clients.
    Etcd,
    /// The front-proxy CA (`front-proxy-ca.crt`): the aggregation layer's client.
    FrontProxy,
    /// Our enrollment CA (`enrollment-ca.crt`): nodes' and the operator's identities on `imgbuild serve`.
    Enrollment,
}

impl CaKind {
    /// Every CA, in the order `init` makes them.
    pub const ALL: [CaKind; 4] = [CaKind::Cluster, CaKind::Etcd, CaKind::FrontProxy, CaKind::Enrollment];

    /// The name `--rotate` takes.
    pub fn name(self) -> &'static str {
        match self {
            CaKind::Cluster => "ca",
            CaKind::Etcd => "etcd-ca",
            CaKind::FrontProxy => "front-proxy-ca",
            CaKind::Enrollment => "enrollment-ca",
        }
    }

    /// Certificate path relative to the PKI directory (kubeadm's names).
    pub fn cert_file(self) -> &'static str {
        match self {
            CaKind::Cluster => "ca.crt",
            CaKind::Etcd => "etcd/ca.crt",
            CaKind::FrontProxy => "front-proxy-ca.crt",
            CaKind::Enrollment => "enrollment-ca.crt",
        }
    }

    /// Key path relative to the PKI directory (kubeadm's names).
    pub fn key_file(self) -> &'static str {
        match self {
            CaKind::Cluster => "ca.key",
            CaKind::Etcd => "etcd/ca.key",
            CaKind::FrontProxy => "front-proxy-ca.key",
            CaKind::Enrollment => "enrollment-ca.key",
        }
    }

    fn common_name(self) -> &'static str {
        match self {
            CaKind::Cluster => "kubernetes",
            CaKind::Etcd => "etcd-ca",
            CaKind::FrontProxy => "front-proxy-ca",
            CaKind::Enrollment => "imgbuild-enrollment-ca",
        }
    }
}

/// What a leaf certificate is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server authentication.
    Server,
    /// TLS client authentication.
    Client,
    /// Both (etcd members dial each other and themselves).
    ServerAndClient,
}

impl Usage {
    fn ekus(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAndClient => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        }
    }
}

/// Everything a leaf certificate says, decided by policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// The CA that issues it.
    pub ca: CaKind,
    /// Subject CN: the user name for Kubernetes clients.
    pub common_name: String,
    /// Subject O: the groups for Kubernetes clients.
    pub organizations: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ips: Vec<IpAddr>,
    /// Server, client or both.
    pub usage: Usage,
}

/// The node a certificate is for.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node's name.
    pub name: String,
    /// The node's role: decides which purposes it may have.
    pub role: Role,
    /// The node's address, put in its serving certificates' SANs.
    pub ip: Option<Ipv4Addr>,
}

fn spec(ca: CaKind, cn: &str, orgs: &[&str], usage: Usage) -> LeafSpec {
    LeafSpec {
        ca,
        common_name: cn.to_string(),
        organizations: orgs.iter().map(|s| s.to_string()).collect(),
        dns_names: vec![],
        ips: vec![],
        usage,
    }
}

/// The policy: subject, SANs, usages and issuing CA for each node certificate purpose, as kubeadm
/// issues them. Returns `None` when the purpose is not for this node's role.
pub fn leaf_spec(purpose: CertPurpose, cluster: &Cluster, node: &NodeIdentity) -> Option<LeafSpec> {
    use CertPurpose as P;
    let master = node.role == Role::Master;
    let etcd_member = cluster.etcd_members().any(|m| m.name == node.name);
    let node_ips: Vec<IpAddr> = node.ip.map(IpAddr::V4).into_iter().collect();
    let loopback = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    Some(match purpose {
        P::Apiserver if master => {
            let domain = &cluster.networks.dns_domain;
            let mut s = spec(CaKind::Cluster, "kube-apiserver", &[], Usage::Server);
            s.dns_names = vec![
                node.name.clone(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                format!("kubernetes.default.svc.{domain}"),
                "localhost".into(),
            ];
            s.ips = [IpAddr::V4(cluster.networks.first_service_ip()), IpAddr::V4(cluster.api.vip)]
                .into_iter()
                .chain(node_ips)
                .chain(loopback)
                .collect();
            s
        }
        P::ApiserverKubeletClient if master => {
            spec(CaKind::Cluster, "kube-apiserver-kubelet-client", &["system:masters"], Usage::Client)
        }
        P::ApiserverEtcdClient if master => {
            spec(CaKind::Etcd, "kube-apiserver-etcd-client", &["system:masters"], Usage::Client)
        }
        P::FrontProxyClient if master => spec(CaKind::FrontProxy, "front-proxy-client", &[], Usage::Client),
        P::EtcdServer | P::EtcdPeer if etcd_member => {
            // etcd dials itself with its server certificate under client-cert auth: both EKUs.
            let mut s = spec(CaKind::Etcd, &node.name, &[], Usage::ServerAndClient);
            s.dns_names = vec![node.name.clone(), "localhost".into()];
            s.ips = node_ips.into_iter().chain(loopback).collect();
            s
        }
        P::EtcdHealthcheckClient if etcd_member || master => {
            spec(CaKind::Etcd, "kube-etcd-healthcheck-client", &[], Usage::Client)
        }
        P::ControllerManager if master => spec(CaKind::Cluster, "system:kube-controller-manager", &[], Usage::Client),
        P::Scheduler if master => spec(CaKind::Cluster, "system:kube-scheduler", &[], Usage::Client),
        P::Admin if master => admin_spec(),
        P::KubeletServing if node.role != Role::Etcd => {
            let mut s = spec(CaKind::Cluster, &format!("system:node:{}", node.name), &["system:nodes"], Usage::Server);
            s.dns_names = vec![node.name.clone()];
            s.ips = node_ips;
            s
        }
        P::KubeProxy if node.role != Role::Etcd => spec(CaKind::Cluster, "system:kube-proxy", &[], Usage::Client),
        _ => return None,
    })
}

/// The operator's admin credentials (`admin.conf`).
pub fn admin_spec() -> LeafSpec {
    spec(CaKind::Cluster, "kubernetes-admin", &["system:masters"], Usage::Client)
}

/// `imgbuild serve`'s serving certificate: the hosts of every enrollment server URL, and loopback.
pub fn enroll_server_spec(cluster: &Cluster) -> LeafSpec {
    let mut s = spec(CaKind::Cluster, "imgbuild-serve", &[], Usage::Server);
    s.dns_names.push("localhost".into());
    s.ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    for server in &cluster.enrollment.servers {
        match server.host.parse::<IpAddr>() {
            Ok(ip) if !s.ips.contains(&ip) => s.ips.push(ip),
            Ok(_) => {}
            Err(_) if !s.dns_names.contains(&server.host) => s.dns_names.push(server.host.clone()),
            Err(_) => {}
        }
    }
    s
}

/// The organization of the operator's identity on `imgbuild serve`: only certificates from the
/// enrollment CA with it may call the operator's API (nodes never get it: theirs is
/// `imgbuild:<role>`, decided by the server).
pub const ADMIN_ORGANIZATION: &str = "imgbuild:admins";

/// The operator's identity on `imgbuild serve` (`pki/imgbuild-admin.*` in the state dir).
pub fn serve_admin_spec() -> LeafSpec {
    spec(CaKind::Enrollment, "imgbuild-admin", &[ADMIN_ORGANIZATION], Usage::Client)
}

/// The client certificate a node uses with `imgbuild serve` after enrollment.
pub fn enroll_client_spec(node: &str, role: Role) -> LeafSpec {
    spec(CaKind::Enrollment, node, &[&format!("imgbuild:{role}")], Usage::Client)
}

/// A new private key of the cluster's algorithm.
pub fn generate_key(alg: KeyAlgorithm) -> Result<KeyPair, PkiError> {
    match alg {
        KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(crypto),
        KeyAlgorithm::Rsa2048 => {
            // ring signs with RSA but cannot generate RSA keys; the `rsa` crate makes the key.
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(crypto)?;
            let der = key.to_pkcs8_der().map_err(crypto)?;
            KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der.as_bytes()), &PKCS_RSA_SHA256)
                .map_err(crypto)
        }
    }
}

/// Loads a PKCS#8 PEM private key (ECDSA, Ed25519 or RSA).
pub fn key_from_pem(pem: &str) -> Result<KeyPair, rcgen::Error> {
    KeyPair::from_pem(pem).or_else(|_| KeyPair::from_pkcs8_pem_and_sign_algo(pem, &PKCS_RSA_SHA256))
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).map_err(|_| PkiError::Crypto("the system CSPRNG failed".into()))?;
    // A positive INTEGER without a leading zero octet: 127 random bits.
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&b))
}

/// Certificates are valid from a few minutes ago, so that nodes with a slightly slow clock
/// accept them.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// A CA that can issue certificates.
pub struct Ca {
    /// Which of the cluster's CAs it is.
    pub kind: CaKind,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    cert_der: CertificateDer<'static>,
    pin: CaPin,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA. Returns the CA and its private key as PEM.
    pub fn generate(kind: CaKind, alg: KeyAlgorithm, validity: Duration) -> Result<(Ca, String), PkiError> {
        let key = generate_key(alg)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, kind.common_name());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial()?);
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let cert = params.self_signed(&key).map_err(crypto)?;
        let key_pem = key.serialize_pem();
        let ca = Ca {
            kind,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            // Self-signed: the certificate's SubjectPublicKeyInfo is the key's.
            pin: CaPin::of_spki_der(&key.subject_public_key_info()),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// A CA from its certificate and key PEM; `origin` names them in errors.
    pub fn from_pem(kind: CaKind, cert_pem: &str, key_pem: &str, origin: &Path) -> Result<Ca, PkiError> {
        let invalid = |reason: String| PkiError::Invalid { path: origin.to_path_buf(), reason };
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(format!("certificate PEM: {e}")))?;
        let key = key_from_pem(key_pem).map_err(|e| invalid(format!("private key: {e}")))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(format!("certificate: {e}")))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(format!("{} and {} do not belong together", kind.cert_file(), kind.key_file())));
        }
        let pin = CaPin::of_spki_der(x509.public_key().raw);
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| invalid(format!("CA certificate: {e}")))?;
        Ok(Ca { kind, cert_pem: cert_pem.to_string(), cert_der: der.into_owned(), pin, not_after, issuer })
    }

    /// Loads a CA from a PKI directory.
    pub fn load(pki_dir: &Path, kind: CaKind) -> Result<Ca, PkiError> {
        let read = |rel: &str| {
            let path = pki_dir.join(rel);
            std::fs::read_to_string(&path).map_err(|source| PkiError::Read { path, source })
        };
        Ca::from_pem(kind, &read(kind.cert_file())?, &read(kind.key_file())?, &pki_dir.join(kind.cert_file()))
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// kubeadm's `--discovery-token-ca-cert-hash` for this CA.
    pub fn pin(&self) -> CaPin {
        self.pin
    }

    /// Issues a certificate for `public_key` as `spec` says.
    pub fn issue(
        &self,
        spec: &LeafSpec,
        public_key: &impl PublicKeyData,
        validity: Duration,
    ) -> Result<String, PkiError> {
        assert_eq!(spec.ca, self.kind, "leaf spec for {:?} given to the {:?} CA", spec.ca, self.kind);
        let now = OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        for o in &spec.organizations {
            p.distinguished_name.push(DnType::OrganizationName, o.as_str());
        }
        p.distinguished_name.push(DnType::CommonName, spec.common_name.as_str());
        p.subject_alt_names = spec
            .dns_names
            .iter()
            .map(|d| d.clone().try_into().map(SanType::DnsName).map_err(crypto))
            .chain(spec.ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, _>>()?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if public_key.algorithm() == &PKCS_RSA_SHA256 {
            // RSA key exchange (TLS 1.2 without ECDHE) encrypts to the key; ECDSA keys cannot.
            p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        p.extended_key_usages = spec.usage.ekus();
        p.serial_number = Some(random_serial()?);
        p.not_before = now - BACKDATE;
        // A certificate never outlives its CA.
        p.not_after = (now + validity).min(self.not_after);
        p.use_authority_key_identifier_extension = true;
        Ok(p.signed_by(public_key, &self.issuer).map_err(crypto)?.pem())
    }

    /// Issues a certificate for a new key; returns (certificate PEM, key PEM).
    pub fn issue_with_new_key(
        &self,
        spec: &LeafSpec,
        alg: KeyAlgorithm,
        validity: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = generate_key(alg)?;
        Ok((self.issue(spec, &key, validity)?, key.serialize_pem()))
    }

    /// Signs a CSR under `spec`: only the public key is taken from the CSR. Returns the
    /// certificate PEM and the DER SubjectPublicKeyInfo it certifies.
    pub fn sign_csr(&self, spec: &LeafSpec, csr_pem: &str, validity: Duration) -> Result<(String, Vec<u8>), PkiError> {
        let csr = Csr::verify(csr_pem, None)?;
        Ok((self.sign(spec, &csr, validity)?, csr.spki().to_vec()))
    }

    /// A certificate under `spec` for the key of a verified CSR that asks for nothing more.
    pub fn sign(&self, spec: &LeafSpec, csr: &Csr, validity: Duration) -> Result<String, PkiError> {
        csr.check(spec)?;
        let public_key =
            SubjectPublicKeyInfo::from_der(csr.spki()).map_err(|e| PkiError::CsrRefused(format!("public key: {e}")))?;
        self.issue(spec, &public_key, validity)
    }
}

/// A CSR whose self-signature and key are verified; [`Csr::check`] then compares what it asks
/// for with a policy. Verification is the costly part and happens once.
pub struct Csr {
    der: Vec<u8>,
    spki: Vec<u8>,
}

impl Csr {
    /// Parses a PEM CSR and verifies its self-signature and key (ECDSA P-256/P-384, RSA
    /// 2048-8192). With `binding`, its challengePassword must be exactly that: the channel
    /// binding of the connection it came on (so a CSR taken from another connection is refused).
    pub fn verify(pem: &str, binding: Option<&str>) -> Result<Csr, PkiError> {
        use x509_parser::certification_request::X509CertificationRequest;
        use x509_parser::cri_attributes::ParsedCriAttribute;
        let refuse = |r: String| PkiError::CsrRefused(r);
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| refuse(format!("not a PEM certificate request: {e}")))?;
        let (_, csr) =
            X509CertificationRequest::from_der(&der).map_err(|e| refuse(format!("not a PKCS#10 request: {e}")))?;
        csr.verify_signature().map_err(|_| refuse("its self-signature does not verify".into()))?;
        let info = &csr.certification_request_info;
        use x509_parser::public_key::PublicKey;
        match info.subject_pki.parsed() {
            Ok(PublicKey::EC(ec)) if matches!(ec.key_size(), 256 | 384) => {}
            Ok(PublicKey::RSA(rsa)) if (2048..=8192).contains(&rsa.key_size()) => {}
            Ok(PublicKey::EC(ec)) => {
                return Err(refuse(format!("EC key of {} bits (P-256 or P-384 accepted)", ec.key_size())));
            }
            Ok(PublicKey::RSA(rsa)) => {
                return Err(refuse(format!("RSA key of {} bits (2048 to 8192 accepted)", rsa.key_size())));
            }
            _ => return Err(refuse("unsupported key type (ECDSA P-256/P-384 or RSA accepted)".into())),
        }
        if let Some(want) = binding {
            let got = csr.certification_request_info.iter_attributes().find_map(|a| match a.parsed_attribute() {
                ParsedCriAttribute::ChallengePassword(p) => Some(p.0.clone()),
                _ => None,
            });
            match got {
                Some(got) if got == want => {}
                Some(_) => return Err(refuse("it is bound to another TLS connection (challengePassword)".into())),
                None => {
                    return Err(refuse(
                        "it carries no channel binding (challengePassword with this connection's tls-exporter value)"
                            .into(),
                    ));
                }
            }
        }
        let spki = info.subject_pki.raw.to_vec();
        Ok(Csr { der: der.as_ref().to_vec(), spki })
    }

    /// The DER SubjectPublicKeyInfo it asks a certificate for.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    /// Refuses a request for anything the policy does not grant: another subject, a name not
    /// the node's, a usage beyond the purpose's, a CA flag, an unknown extension.
    pub fn check(&self, spec: &LeafSpec) -> Result<(), PkiError> {
        use x509_parser::certification_request::X509CertificationRequest;
        let refuse = |r: String| PkiError::CsrRefused(r);
        let (_, csr) =
            X509CertificationRequest::from_der(&self.der).map_err(|e| refuse(format!("not a PKCS#10 request: {e}")))?;
        let info = &csr.certification_request_info;
        for attr in info.subject.iter_attributes() {
            let value = attr.as_str().unwrap_or("<non-string>");
            let oid = attr.attr_type();
            if *oid == x509_parser::oid_registry::OID_X509_COMMON_NAME {
                if value != spec.common_name {
                    return Err(refuse(format!(
                        "asks for CN {value:?}; this node's certificate is for {:?}",
                        spec.common_name
                    )));
                }
            } else if *oid == x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME {
                if !spec.organizations.iter().any(|o| o == value) {
                    return Err(refuse(format!("asks for organization {value:?}, which is not granted")));
                }
            } else {
                return Err(refuse(format!(
                    "asks for subject attribute {oid} = {value:?}; only CN and O may be given"
                )));
            }
        }
        for ext in csr.requested_extensions().into_iter().flatten() {
            match ext {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(refuse("asks to be a CA".into()));
                }
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(refuse("asks for a key usage to sign certificates or CRLs".into()));
                }
                ParsedExtension::BasicConstraints(_) | ParsedExtension::KeyUsage(_) => {}
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    let granted = spec.usage.ekus();
                    let wants_server = eku.server_auth && !granted.contains(&ExtendedKeyUsagePurpose::ServerAuth);
                    let wants_client = eku.client_auth && !granted.contains(&ExtendedKeyUsagePurpose::ClientAuth);
                    if eku.any
                        || wants_server
                        || wants_client
                        || eku.code_signing
                        || eku.email_protection
                        || eku.time_stamping
                        || eku.ocsp_signing
                        || !eku.other.is_empty()
                    {
                        return Err(refuse(format!("asks for extended key usages beyond {:?}", spec.usage)));
                    }
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        let allowed = match name {
                            GeneralName::DNSName(d) => spec.dns_names.iter().any(|n| n == d),
                            GeneralName::IPAddress(b) => ip_from_bytes(b).is_some_and(|ip| spec.ips.contains(&ip)),
                            _ => false,
                        };
                        if !allowed {
                            return Err(refuse(format!(
                                "asks for the foreign name {name}; this node may have {:?} {:?}",
                                spec.dns_names, spec.ips
                            )));
                        }
                    }
                }
                ParsedExtension::UnsupportedExtension { oid } => {
                    return Err(refuse(format!("asks for the unknown extension {oid}")));
                }
                other => {
                    return Err(refuse(format!("asks for an extension that is not granted: {other:?}")));
                }
            }
        }
        Ok(())
    }
}

/// Checks a CSR against the policy: a valid self-signature, an acceptable key, and no request
/// for anything the policy does not grant. Returns the DER SubjectPublicKeyInfo.
pub fn check_csr(spec: &LeafSpec, csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    let csr = Csr::verify(csr_pem, None)?;
    csr.check(spec)?;
    Ok(csr.spki)
}

/// What a certificate says, for checks and listings.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The subject distinguished name, as text.
    pub subject: String,
    /// When the certificate expires.
    pub not_after: OffsetDateTime,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ips: Vec<IpAddr>,
}

impl CertInfo {
    /// Parses the first certificate of a PEM text.
    pub fn parse(pem: &str) -> Option<CertInfo> {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
        let (mut dns_names, mut ips) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                    GeneralName::IPAddress(b) => ips.extend(ip_from_bytes(b)),
                    _ => {}
                }
            }
        }
        Some(CertInfo {
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.to_datetime(),
            dns_names,
            ips,
        })
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
