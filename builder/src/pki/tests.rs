use std::process::Command;

use super::*;
use crate::cluster::{Cluster, DEFAULT_MANIFEST};

fn cluster() -> Cluster {
    Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap()
}

fn node(c: &Cluster, name: &str) -> NodeIdentity {
    let n = c.node(name).unwrap();
    NodeIdentity { name: n.name.clone(), role: n.role, ip: Some(n.ip()) }
}

const YEAR: Duration = Duration::from_secs(365 * 86400);

fn csr_for(key: &KeyPair, edit: impl FnOnce(&mut CertificateParams)) -> String {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    edit(&mut p);
    p.serialize_request(key).unwrap().pem().unwrap()
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().expect("openssl is installed (.ci/setup-host)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_issued_chain_verifies_with_openssl_and_has_the_right_usages() {
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    for alg in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let cas: Vec<Ca> = CaKind::ALL.iter().map(|k| Ca::generate(*k, alg, 10 * YEAR).unwrap().0).collect();
        // RSA key generation costs ~0.5 s here: the leaves share one key (what is checked is the
        // certificate each spec yields, not the key).
        let leaf_key = generate_key(alg).unwrap();
        let ca = |k: CaKind| cas.iter().find(|c| c.kind == k).unwrap();
        let mut specs: Vec<(String, LeafSpec)> = vec![
            ("admin".into(), admin_spec()),
            ("serve".into(), enroll_server_spec(&c)),
            ("enroll-client".into(), enroll_client_spec("k8s-worker1", Role::Worker)),
        ];
        for purpose in CertPurpose::ALL {
            let n = node(&c, "k8s-master1");
            specs.push((
                purpose.to_string(),
                leaf_spec(purpose, &c, &n).unwrap_or_else(|| panic!("{purpose} for a master")),
            ));
        }
        for (name, spec) in specs {
            let cert = ca(spec.ca).issue(&spec, &leaf_key, YEAR).unwrap();
            let ca_path = dir.path().join(format!("{name}-ca.pem"));
            let cert_path = dir.path().join(format!("{name}.pem"));
            std::fs::write(&ca_path, &ca(spec.ca).cert_pem).unwrap();
            std::fs::write(&cert_path, &cert).unwrap();
            let purpose = match spec.usage {
                Usage::Server | Usage::ServerAndClient => "sslserver",
                Usage::Client => "sslclient",
            };
            let (ok, out) = openssl(&[
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                ca_path.to_str().unwrap(),
                cert_path.to_str().unwrap(),
            ]);
            assert!(ok, "{alg:?} {name}: {out}");
            let (_, text) = openssl(&["x509", "-in", cert_path.to_str().unwrap(), "-noout", "-text"]);
            assert!(
                text.contains(&format!("CN = {}", spec.common_name))
                    || text.contains(&format!("CN={}", spec.common_name)),
                "{name}: {text}"
            );
            assert!(text.contains("CA:FALSE"), "{name}: {text}");
            let eku_server = text.contains("TLS Web Server Authentication");
            let eku_client = text.contains("TLS Web Client Authentication");
            assert_eq!(
                (eku_server, eku_client),
                match spec.usage {
                    Usage::Server => (true, false),
                    Usage::Client => (false, true),
                    Usage::ServerAndClient => (true, true),
                },
                "{name}: {text}"
            );
            assert_eq!(text.contains("Key Encipherment"), alg == KeyAlgorithm::Rsa2048, "{name}: {text}");
            for dns in &spec.dns_names {
                assert!(text.contains(&format!("DNS:{dns}")), "{name} lacks DNS:{dns}");
            }
            for ip in &spec.ips {
                assert!(text.contains(&format!("IP Address:{ip}")), "{name} lacks IP {ip}");
            }
        }
    }
}

#[test]
fn apiserver_cert_carries_every_name_clients_use() {
    let c = cluster();
    let s = leaf_spec(CertPurpose::Apiserver, &c, &node(&c, "k8s-master2")).unwrap();
    for want in
        ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.k8s.org", "k8s-master2"]
    {
        assert!(s.dns_names.iter().any(|d| d == want), "missing {want}");
    }
    for want in ["10.40.0.1", "192.168.3.110", "192.168.3.112"] {
        assert!(s.ips.contains(&want.parse().unwrap()), "missing {want}");
    }
}

#[test]
fn workers_get_no_control_plane_certs() {
    let c = cluster();
    let w = node(&c, "k8s-worker1");
    for p in CertPurpose::ALL {
        let got = leaf_spec(p, &c, &w);
        assert_eq!(got.is_some(), matches!(p, CertPurpose::KubeletServing | CertPurpose::KubeProxy), "{p}");
    }
}

#[test]
fn ca_validity_serials_and_pin() {
    let (ca, key) = Ca::generate(CaKind::Cluster, KeyAlgorithm::EcdsaP256, 10 * YEAR).unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ca.crt"), &ca.cert_pem).unwrap();
    std::fs::write(d.path().join("ca.key"), &key).unwrap();
    let loaded = Ca::load(d.path(), CaKind::Cluster).unwrap();
    assert_eq!(loaded.pin(), ca.pin());
    // Same pin as openssl computes it (kubeadm's recipe).
    let (_, pubkey) = openssl(&["x509", "-in", d.path().join("ca.crt").to_str().unwrap(), "-pubkey", "-noout"]);
    std::fs::write(d.path().join("pub.pem"), pubkey).unwrap();
    let (_, der_hex) = openssl(&[
        "pkey",
        "-pubin",
        "-in",
        d.path().join("pub.pem").to_str().unwrap(),
        "-outform",
        "der",
        "-out",
        d.path().join("pub.der").to_str().unwrap(),
    ]);
    let _ = der_hex;
    let der = std::fs::read(d.path().join("pub.der")).unwrap();
    assert_eq!(CaPin::of_spki_der(&der), ca.pin());

    let (_, text) = openssl(&["x509", "-in", d.path().join("ca.crt").to_str().unwrap(), "-noout", "-text", "-dates"]);
    assert!(text.contains("CA:TRUE") && text.contains("Certificate Sign"), "{text}");
    // Two leaves for the same key get different random serials.
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let a = ca.issue(&admin_spec(), &key, YEAR).unwrap();
    let b = ca.issue(&admin_spec(), &key, YEAR).unwrap();
    let serial = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        x509_parser::parse_x509_certificate(&der).unwrap().1.raw_serial().to_vec()
    };
    assert_ne!(serial(&a), serial(&b));
    assert!(serial(&a).len() >= 15);
}

#[test]
fn mismatched_ca_key_is_refused() {
    let (ca, _) = Ca::generate(CaKind::Cluster, KeyAlgorithm::EcdsaP256, YEAR).unwrap();
    let (_, other_key) = Ca::generate(CaKind::Cluster, KeyAlgorithm::EcdsaP256, YEAR).unwrap();
    let e = Ca::from_pem(CaKind::Cluster, &ca.cert_pem, &other_key, Path::new("pki/ca.crt")).err().unwrap();
    assert!(e.to_string().contains("do not belong together"), "{e}");
}

#[test]
fn leaf_never_outlives_its_ca() {
    let (ca, _) = Ca::generate(CaKind::Cluster, KeyAlgorithm::EcdsaP256, Duration::from_secs(86400)).unwrap();
    let (pem, _) = ca.issue_with_new_key(&admin_spec(), KeyAlgorithm::EcdsaP256, YEAR).unwrap();
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(cert.validity().not_after.to_datetime() <= ca.not_after);
}

#[test]
fn csr_policy_cases() {
    let c = cluster();
    let n = node(&c, "k8s-master1");
    let (etcd_ca, _) = Ca::generate(CaKind::Etcd, KeyAlgorithm::EcdsaP256, YEAR).unwrap();
    let spec = leaf_spec(CertPurpose::EtcdServer, &c, &n).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    type Edit = Box<dyn Fn(&mut CertificateParams)>;
    let cases: Vec<(&str, Edit, Option<&str>)> = vec![
        ("empty subject", Box::new(|_| {}), None),
        (
            "own names",
            Box::new(|p| {
                p.distinguished_name.push(DnType::CommonName, "k8s-master1");
                p.subject_alt_names = vec![
                    SanType::DnsName("k8s-master1".try_into().unwrap()),
                    SanType::IpAddress("192.168.3.111".parse().unwrap()),
                ];
            }),
            None,
        ),
        // basicConstraints (2.5.29.19) = SEQUENCE { cA BOOLEAN TRUE }; rcgen cannot put is_ca in a CSR.
        (
            "asks for CA",
            Box::new(|p| {
                p.custom_extensions =
                    vec![rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff])]
            }),
            Some("asks to be a CA"),
        ),
        (
            "foreign DNS",
            Box::new(|p| p.subject_alt_names = vec![SanType::DnsName("k8s-master2".try_into().unwrap())]),
            Some("foreign name"),
        ),
        (
            "foreign IP",
            Box::new(|p| p.subject_alt_names = vec![SanType::IpAddress("192.168.3.112".parse().unwrap())]),
            Some("foreign name"),
        ),
        (
            "foreign CN",
            Box::new(|p| p.distinguished_name.push(DnType::CommonName, "system:masters")),
            Some("asks for CN"),
        ),
        (
            "foreign O",
            Box::new(|p| p.distinguished_name.push(DnType::OrganizationName, "system:masters")),
            Some("organization"),
        ),
        (
            "unknown extension",
            Box::new(|p| {
                p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(&[1, 2, 3, 4, 5], vec![5, 0])]
            }),
            Some("unknown extension"),
        ),
        (
            "code signing",
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]),
            Some("extended key usages"),
        ),
    ];
    for (name, edit, refusal) in cases {
        let csr = csr_for(&key, edit);
        match (etcd_ca.sign_csr(&spec, &csr, YEAR), refusal) {
            (Ok((cert, spki)), None) => {
                assert_eq!(spki, key.subject_public_key_info(), "{name}");
                let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
                let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
                assert_eq!(x.subject().to_string(), "CN=k8s-master1", "{name}");
                assert!(!x.is_ca(), "{name}");
            }
            (Err(PkiError::CsrRefused(r)), Some(frag)) => assert!(r.contains(frag), "{name}: {r}"),
            (got, want) => panic!("{name}: got {:?}, want refusal {want:?}", got.map(|_| ())),
        }
    }
}

#[test]
fn csr_with_bad_signature_or_weak_key_is_refused() {
    let c = cluster();
    let spec = leaf_spec(CertPurpose::KubeletServing, &c, &node(&c, "k8s-worker1")).unwrap();
    let (ca, _) = Ca::generate(CaKind::Cluster, KeyAlgorithm::EcdsaP256, YEAR).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = csr_for(&key, |_| {});
    let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap().as_ref().to_vec();
    let last = der.len() - 3;
    der[last] ^= 0xff;
    let pem =
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", base64_lines(&der));
    let e = ca.sign_csr(&spec, &pem, YEAR).err().unwrap();
    assert!(e.to_string().contains("self-signature"), "{e}");
    assert!(ca.sign_csr(&spec, "garbage", YEAR).is_err());
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(der)
}
