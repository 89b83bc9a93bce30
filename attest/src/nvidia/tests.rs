//! Tests on nvtrust's genuine Hopper sample (tests/fixtures/nvidia-hopper/).

use std::time::{Duration, SystemTime};

use der::asn1::BitString;
use der::{Decode, Encode};
use p384::ecdsa::signature::Signer as _;
use p384::pkcs8::EncodePublicKey as _;
use x509_cert::spki::SubjectPublicKeyInfoOwned;

use super::*;

const REPORT_HEX: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nvidia-hopper/hopperAttestationReport.txt"
));
const CHAIN_PEM: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nvidia-hopper/hopperCertChain.txt"
));
const ROOT_PEM: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/nvidia-hopper/verifier_device_root.pem"
));
/// The request nonce of the sample.
const NONCE_HEX: &str = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb";
const RESPONSE_NONCE_HEX: &str = "b4b8a06aaaa35542839388e159d447a5d6f6194998fd86513e2d591ccf640985";
const FWID_HEX: &str = "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d";

/// 2024-06-01T00:00:00Z: after every notBefore (latest 2022-03-01), before
/// every notAfter (9999-12-31).
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_717_200_000)
}

fn report() -> Vec<u8> {
    report_from_hex(REPORT_HEX).unwrap()
}

fn nonce() -> [u8; 32] {
    crate::evidence::hex32(NONCE_HEX).unwrap()
}

fn certs() -> Vec<Certificate> {
    parse_pem_chain(CHAIN_PEM.as_bytes()).unwrap()
}

fn to_pem(certs: &[Certificate]) -> Vec<u8> {
    certs
        .iter()
        .map(|c| {
            der::pem::encode_string(
                "CERTIFICATE",
                der::pem::LineEnding::LF,
                &c.to_der().unwrap(),
            )
            .unwrap()
        })
        .collect::<String>()
        .into_bytes()
}

fn verify_with(chain: &[Certificate]) -> Result<VerifiedGpu, NvidiaError> {
    verify_report(&report(), &to_pem(chain), &nonce(), now())
}

#[test]
fn the_sample_parses() {
    let bytes = report();
    assert_eq!(bytes.len(), 4117);
    let r = parse_report(&bytes).unwrap();
    assert_eq!(r.signed_len, 4117 - SIGNATURE_LEN);
    assert_eq!(r.request.version, 0x11);
    assert!(r.request.signature_requested());
    assert_eq!(r.request.param2, 0xFF);
    assert_eq!(r.request.slot(), 0);
    assert_eq!(hex::encode(r.request.nonce), NONCE_HEX);
    assert_eq!(hex::encode(r.response.nonce), RESPONSE_NONCE_HEX);
    assert_eq!(r.response.blocks.len(), 64);
    for (i, b) in r.response.blocks.iter().enumerate() {
        assert_eq!(usize::from(b.index), i + 1);
        assert_eq!(b.spec, DMTF_MEASUREMENT_SPEC);
        assert_eq!(b.value_type, 1);
        assert_eq!(b.value.len(), 48);
    }
    assert_eq!(r.response.driver_version().unwrap(), "550.90.07");
    assert_eq!(r.response.vbios_version().unwrap(), "96.00.9F.00.01");
    assert_eq!(
        hex::encode(r.response.opaque(opaque::FWID).unwrap()),
        FWID_HEX
    );
    let names: Vec<_> = r.response.opaque.iter().map(|f| f.name).collect();
    assert!(names.contains(&Some("DRIVER_VERSION")));
    assert!(names.contains(&Some("PROJECT")));
    assert!(r.response.opaque.iter().all(|f| f.name.is_some()));
    assert_eq!(r.response.opaque(opaque::PROJECT).unwrap(), b"1010\0");
    assert_eq!(
        r.response.opaque(opaque::CHIP_SKU).unwrap(),
        b"882\0\0\0\0\0\0"
    );
    assert_eq!(r.response.opaque(opaque::NVDEC0_STATUS).unwrap(), [0x55]);
}

#[test]
fn the_sample_verifies_to_the_pinned_root() {
    assert_eq!(pinned_root().unwrap(), certs()[4]);
    assert_eq!(
        PINNED_ROOT_PEM.trim(),
        ROOT_PEM.trim(),
        "the embedded root is the fixture's"
    );
    let v = verify_report(&report(), CHAIN_PEM.as_bytes(), &nonce(), now()).unwrap();
    assert_eq!(v.measurements.len(), 64);
    assert_eq!(v.measurements[&1].len(), 96);
    assert_eq!(v.driver_version, "550.90.07");
    assert_eq!(v.vbios_version, "96.00.9F.00.01");
    assert_eq!(v.fwid.as_deref(), Some(FWID_HEX));
    assert_eq!(v.response_nonce, RESPONSE_NONCE_HEX);
    assert_eq!(v.leaf_serial, "53c22ba15e5d68088282da074ed9fb37aa585771");
    assert!(
        v.leaf_subject.contains("CN=GH100 A01 GSP FMC LF"),
        "{}",
        v.leaf_subject
    );
    // Without the root in the chain: the pinned one is appended.
    verify_with(&certs()[..4]).unwrap();
    // The pinned root alone verifies itself at `now`.
    assert_eq!(verify_chain(certs(), now()).unwrap().len(), 5);
}

#[test]
fn another_nonce_is_refused() {
    let mut other = nonce();
    other[31] ^= 1;
    let e = verify_report(&report(), CHAIN_PEM.as_bytes(), &other, now()).unwrap_err();
    assert_eq!(
        e,
        NvidiaError::NonceMismatch {
            expected: hex::encode(other),
            found: NONCE_HEX.into()
        }
    );
}

// Every byte of the report (the signed range and the signature), each
// flipped, against the leaf key (about a millisecond per P-384
// verification with the crypto crates optimised, see the root Cargo.toml);
// then a sparse stride through the whole path, chain included.
#[test]
fn flipped_bytes_are_refused() {
    let good = report();
    let leaf = certs().remove(0);
    let n = nonce();
    let signed = good.len() - SIGNATURE_LEN;
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        let result = parse_report(&bad).and_then(|p| verify_parsed(&bad, p, &leaf, &n));
        assert!(result.is_err(), "flipping byte {i} still verifies");
        if i >= signed {
            assert_eq!(
                result.unwrap_err(),
                NvidiaError::ReportSignature,
                "byte {i}"
            );
        }
    }
    for i in (0..good.len()).step_by(257).chain([good.len() - 1]) {
        let mut bad = good.clone();
        bad[i] ^= 0x80;
        assert!(
            verify_report(&bad, CHAIN_PEM.as_bytes(), &n, now()).is_err(),
            "flipping byte {i} still verifies"
        );
    }
}

#[test]
fn wrong_chains_are_refused() {
    let c = certs();
    // A certificate removed.
    let removed = [c[0].clone(), c[2].clone(), c[3].clone(), c[4].clone()];
    assert!(matches!(
        verify_with(&removed),
        Err(NvidiaError::IssuerMismatch { index: 0, .. })
    ));
    // Reordered.
    let swapped = [c[0].clone(), c[2].clone(), c[1].clone(), c[3].clone()];
    assert!(matches!(
        verify_with(&swapped),
        Err(NvidiaError::IssuerMismatch { index: 0, .. })
    ));
    // Only the leaf.
    assert!(matches!(
        verify_with(&c[..1]),
        Err(NvidiaError::IssuerMismatch { index: 0, .. })
    ));
    // Only the root.
    assert_eq!(verify_with(&c[4..]).unwrap_err(), NvidiaError::EmptyChain);
    // Another certificate as the leaf: the chain holds, but it is a CA
    // certificate that may not sign reports.
    assert!(matches!(
        verify_with(&c[1..]),
        Err(NvidiaError::KeyUsage {
            usage: "digital signature",
            ..
        })
    ));
    // A flipped byte in a certificate's signature.
    let mut forged = c.clone();
    let mut sig = forged[2].signature.raw_bytes().to_vec();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    forged[2].signature = BitString::from_bytes(&sig).unwrap();
    assert!(matches!(
        verify_with(&forged),
        Err(NvidiaError::CertificateSignature { index: 2, .. })
    ));
}

/// Signs `tbs` with `key` as ecdsa-with-SHA384.
fn sign(mut cert: Certificate, key: &p384::ecdsa::SigningKey) -> Certificate {
    cert.signature_algorithm.oid = ECDSA_SHA384;
    let sig: p384::ecdsa::Signature = key.sign(&cert.tbs_certificate.to_der().unwrap());
    cert.signature = BitString::from_bytes(sig.to_der().as_bytes()).unwrap();
    cert
}

#[test]
fn a_self_made_root_of_the_same_name_is_refused() {
    let c = certs();
    let key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let spki_der = p384::PublicKey::from(key.verifying_key())
        .to_public_key_der()
        .unwrap();
    let mut root = c[4].clone();
    root.tbs_certificate.subject_public_key_info =
        SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes()).unwrap();
    let root = sign(root, &key);
    // It is a well-formed, self-signed root with NVIDIA's name...
    assert!(signed_by(&root, &root).unwrap());
    // ...that re-signs the GH100 Identity CA.
    let identity = sign(c[3].clone(), &key);
    let mine = [
        c[0].clone(),
        c[1].clone(),
        c[2].clone(),
        identity.clone(),
        root,
    ];
    assert!(matches!(
        verify_with(&mine),
        Err(NvidiaError::RootMismatch { .. })
    ));
    // Without it, the pinned root does not vouch for the re-signed CA.
    assert!(matches!(
        verify_with(&mine[..4]),
        Err(NvidiaError::CertificateSignature { index: 3, .. })
    ));
    // The genuine root swapped for another self-issued certificate.
    let mut other_root = c[4].clone();
    other_root.tbs_certificate.serial_number = c[0].tbs_certificate.serial_number.clone();
    let mut chain = c[..4].to_vec();
    chain.push(other_root);
    assert!(matches!(
        verify_with(&chain),
        Err(NvidiaError::RootMismatch { .. })
    ));
}

#[test]
fn an_issuer_that_is_not_a_ca_is_refused() {
    // The leaf signs a copy of itself whose issuer name is the leaf's
    // subject: the names link and the signature would need the leaf key,
    // so build it with a key of ours posing as a non-CA issuer instead.
    let c = certs();
    let key = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let spki_der = p384::PublicKey::from(key.verifying_key())
        .to_public_key_der()
        .unwrap();
    let mut issuer = c[0].clone(); // no basicConstraints CA
    issuer.tbs_certificate.subject_public_key_info =
        SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes()).unwrap();
    let mut child = c[0].clone();
    child.tbs_certificate.issuer = issuer.tbs_certificate.subject.clone();
    let child = sign(child, &key);
    let e = verify_chain(vec![child, issuer, c[1].clone()], now()).unwrap_err();
    assert!(matches!(e, NvidiaError::NotCa { .. }), "{e}");
}

#[test]
fn now_outside_the_validity_is_refused() {
    let before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_640_995_200); // 2022-01-01
    let e = verify_report(&report(), CHAIN_PEM.as_bytes(), &nonce(), before).unwrap_err();
    assert!(
        matches!(&e, NvidiaError::NotYetValid { subject, not_before, .. }
            if subject.contains("Provisioner ICA 1") && not_before == "2022-03-01T00:00:00Z"),
        "{e}"
    );
    let long_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_577_836_800); // 2020-01-01
    assert!(matches!(
        verify_report(&report(), CHAIN_PEM.as_bytes(), &nonce(), long_before),
        Err(NvidiaError::NotYetValid { .. })
    ));
    let after = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400); // 10000-01-02
    assert!(matches!(
        verify_report(&report(), CHAIN_PEM.as_bytes(), &nonce(), after),
        Err(NvidiaError::Expired { .. })
    ));
}

#[test]
fn truncated_oversize_and_garbage_reports_are_errors() {
    let good = report();
    for len in 0..good.len() {
        assert!(parse_report(&good[..len]).is_err(), "prefix {len} parses");
    }
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        parse_report(&long).unwrap_err(),
        NvidiaError::TrailingBytes {
            after: "signature",
            count: 1
        }
    );
    assert!(matches!(
        parse_report(&[0u8; MAX_REPORT + 1]),
        Err(NvidiaError::TooLarge { .. })
    ));
    assert!(parse_report(&[0u8; 4117]).is_err());
    assert!(parse_report(&[0xFFu8; MAX_REPORT]).is_err());
    let mut x: u32 = 12345;
    let junk: Vec<u8> = (0..5000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    assert!(parse_report(&junk).is_err());
    assert!(verify_report(&junk, CHAIN_PEM.as_bytes(), &nonce(), now()).is_err());
    assert_eq!(report_from_hex("zz").unwrap_err(), NvidiaError::NotHex);
}

/// The sample with `f` applied to its bytes.
fn patched(f: impl FnOnce(&mut Vec<u8>)) -> Result<SpdmReport, NvidiaError> {
    let mut b = report();
    f(&mut b);
    parse_report(&b)
}

const R: usize = REQUEST_LEN; // where the response starts
const REC: usize = R + 8; // where the measurement record starts

#[test]
fn each_structural_check_rejects() {
    assert!(matches!(
        patched(|b| b[0] = 0x10),
        Err(NvidiaError::SpdmVersion {
            message: "request",
            ..
        })
    ));
    assert!(matches!(
        patched(|b| b[1] = 0x81),
        Err(NvidiaError::MessageCode {
            message: "request",
            expected: 0xE0,
            found: 0x81
        })
    ));
    assert_eq!(
        patched(|b| b[2] = 0).unwrap_err(),
        NvidiaError::SignatureNotRequested { param1: 0 }
    );
    // One block (index 1), or the count alone (0): not the whole GPU.
    for op in [0x00, 0x01, 0xFE] {
        assert_eq!(
            patched(|b| b[3] = op).unwrap_err(),
            NvidiaError::NotAllMeasurements { param2: op }
        );
    }
    assert!(matches!(
        patched(|b| b[R] = 0x12),
        Err(NvidiaError::SpdmVersion {
            message: "response",
            ..
        })
    ));
    assert!(matches!(
        patched(|b| b[R + 1] = 0x7F),
        Err(NvidiaError::MessageCode {
            message: "response",
            ..
        })
    ));
    assert_eq!(
        patched(|b| b[R + 3] = 1).unwrap_err(),
        NvidiaError::SlotMismatch {
            expected: 0,
            found: 1
        }
    );
    assert_eq!(
        patched(|b| b[R + 4] = 0).unwrap_err(),
        NvidiaError::NoMeasurementBlocks
    );
    // One block fewer than the record holds.
    assert!(matches!(
        patched(|b| b[R + 4] = 63),
        Err(NvidiaError::TrailingBytes {
            after: "measurement blocks",
            count: 55
        })
    ));
    // One more than it holds.
    assert!(matches!(
        patched(|b| b[R + 4] = 65),
        Err(NvidiaError::Truncated {
            field: "block index",
            ..
        })
    ));
    assert!(matches!(
        patched(|b| b[REC + 1] = 2),
        Err(NvidiaError::MeasurementSpec {
            index: 1,
            expected: 1,
            found: 2
        })
    ));
    assert_eq!(
        patched(|b| b[REC + 55] = 1).unwrap_err(),
        NvidiaError::DuplicateBlock(1)
    );
    // The value size (48) no longer agrees with the block size (51).
    assert_eq!(
        patched(|b| b[REC + 5] = 47).unwrap_err(),
        NvidiaError::MeasurementSize {
            index: 1,
            expected: 50,
            found: 51
        }
    );
    // A record length past the end.
    assert!(matches!(
        patched(|b| b[R + 7] = 0xFF),
        Err(NvidiaError::Truncated {
            field: "measurement record",
            ..
        })
    ));
    // The second opaque type made a duplicate of the first (6).
    let opaque_at = REC + 3520 + 32 + 2;
    assert_eq!(
        patched(|b| b[opaque_at + 4 + 8] = 6).unwrap_err(),
        NvidiaError::DuplicateOpaque(6)
    );
    // An opaque length one short leaves a byte in the TLVs.
    assert!(patched(|b| b[opaque_at - 2] -= 1).is_err());
}

#[test]
fn missing_or_bad_opaque_versions_are_errors() {
    let r = parse_report(&report()).unwrap();
    let mut resp = r.response.clone();
    resp.opaque.retain(|f| f.kind != opaque::DRIVER_VERSION);
    assert_eq!(
        resp.driver_version().unwrap_err(),
        NvidiaError::MissingOpaque {
            field: "driver version"
        }
    );
    let mut resp = r.response.clone();
    resp.opaque.retain(|f| f.kind != opaque::VBIOS_VERSION);
    assert!(resp.vbios_version().is_err());
    let mut resp = r.response;
    for f in &mut resp.opaque {
        if f.kind == opaque::DRIVER_VERSION {
            f.value = b"55\n0\0".to_vec();
        }
    }
    assert!(matches!(
        resp.driver_version(),
        Err(NvidiaError::BadOpaqueText { .. })
    ));
    assert_eq!(format_vbios_version(&[]), "");
    let _ = format_vbios_version(&[1]);
}

#[test]
fn pem_chains_are_bounded_and_strict() {
    assert_eq!(certs().len(), 5);
    assert_eq!(parse_pem_chain(b"").unwrap_err(), NvidiaError::EmptyChain);
    assert_eq!(
        parse_pem_chain(b" \n\t").unwrap_err(),
        NvidiaError::EmptyChain
    );
    assert!(matches!(
        parse_pem_chain(&vec![b' '; MAX_CHAIN_PEM + 1]),
        Err(NvidiaError::TooLarge { .. })
    ));
    assert!(matches!(
        parse_pem_chain(&[0xFF, 0xFE]),
        Err(NvidiaError::Pem(_))
    ));
    let mut text = CHAIN_PEM.to_string();
    text.push_str("trailing words\n");
    assert!(matches!(
        parse_pem_chain(text.as_bytes()),
        Err(NvidiaError::Pem(_))
    ));
    let cut = &CHAIN_PEM[..CHAIN_PEM.len() - 10];
    assert!(matches!(
        parse_pem_chain(cut.as_bytes()),
        Err(NvidiaError::Pem(_))
    ));
    let key = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        parse_pem_chain(key.as_bytes()),
        Err(NvidiaError::Certificate { index: 0, .. })
    ));
    let root = ROOT_PEM.trim().to_string() + "\n";
    let nine = root.repeat(MAX_CHAIN_CERTS + 1);
    assert_eq!(
        parse_pem_chain(nine.as_bytes()).unwrap_err(),
        NvidiaError::TooManyCertificates {
            limit: MAX_CHAIN_CERTS
        }
    );
    assert_eq!(
        parse_pem_chain(root.repeat(MAX_CHAIN_CERTS).as_bytes())
            .unwrap()
            .len(),
        8
    );
    // Every prefix of the chain is an error or a shorter chain, never a panic.
    for len in (0..CHAIN_PEM.len()).step_by(7) {
        if let Ok(c) = parse_pem_chain(&CHAIN_PEM.as_bytes()[..len]) {
            assert!(c.len() < 5);
        }
    }
}

fn evidence() -> GpuCcEvidence {
    GpuCcEvidence {
        uuid: "GPU-11111111-2222-3333-4444-555555555555".into(),
        nonce: NONCE_HEX.into(),
        report: B64.encode(report()),
        cert_chain: CHAIN_PEM.into(),
    }
}

#[test]
fn gpu_evidence_verifies_under_policy() {
    let ev = evidence();
    let json = serde_json::to_string(&ev).unwrap();
    assert_eq!(serde_json::from_str::<GpuCcEvidence>(&json).unwrap(), ev);
    let mut extra: serde_json::Value = serde_json::from_str(&json).unwrap();
    extra["cec_report"] = serde_json::json!("");
    assert!(serde_json::from_value::<GpuCcEvidence>(extra).is_err());

    let any = NvidiaPolicy::default();
    let msg = verify_gpu_evidence(&ev, &nonce(), &any, now()).unwrap();
    assert!(msg.contains("driver 550.90.07"), "{msg}");
    assert!(msg.contains("vbios 96.00.9F.00.01"), "{msg}");
    assert!(msg.contains("64 measurements"), "{msg}");

    let strict = NvidiaPolicy::from_toml(
        "[nvidia]\nallowed_driver_versions = [\"550.90.07\"]\nallowed_vbios_versions = [\"96.00.9f.00.01\"]\n",
    )
    .unwrap();
    verify_gpu_evidence(&ev, &nonce(), &strict, now()).unwrap();
    let old_driver = NvidiaPolicy {
        allowed_driver_versions: Some(vec!["535.104.05".into()]),
        ..NvidiaPolicy::default()
    };
    let e = verify_gpu_evidence(&ev, &nonce(), &old_driver, now()).unwrap_err();
    assert!(
        e.contains("driver 550.90.07 is not in allowed_driver_versions"),
        "{e}"
    );
    let old_vbios = NvidiaPolicy {
        allowed_vbios_versions: Some(vec![]),
        ..NvidiaPolicy::default()
    };
    let e = verify_gpu_evidence(&ev, &nonce(), &old_vbios, now()).unwrap_err();
    assert!(e.contains("vbios 96.00.9F.00.01 is not in"), "{e}");
}

#[test]
fn bad_gpu_evidence_is_refused() {
    let any = NvidiaPolicy::default();
    let mut other = nonce();
    other[0] ^= 1;
    let e = verify_gpu_evidence(&evidence(), &other, &any, now()).unwrap_err();
    assert!(e.contains("evidence nonce is"), "{e}");
    let mut ev = evidence();
    ev.nonce = "00".into();
    assert!(verify_gpu_evidence(&ev, &nonce(), &any, now())
        .unwrap_err()
        .contains("not 32 bytes of hex"));
    let mut ev = evidence();
    ev.report = "!!".into();
    assert!(verify_gpu_evidence(&ev, &nonce(), &any, now())
        .unwrap_err()
        .contains("not base64"));
    let mut ev = evidence();
    ev.report = "A".repeat(20_000);
    assert!(verify_gpu_evidence(&ev, &nonce(), &any, now())
        .unwrap_err()
        .contains("over 8192 bytes"));
    let mut ev = evidence();
    ev.uuid = "G".repeat(MAX_UUID + 1);
    assert!(verify_gpu_evidence(&ev, &nonce(), &any, now()).is_err());
    let mut ev = evidence();
    ev.cert_chain = CHAIN_PEM.replacen("-----BEGIN", "junk\n-----BEGIN", 1);
    assert!(verify_gpu_evidence(&ev, &nonce(), &any, now())
        .unwrap_err()
        .contains("not PEM"));
    assert!(NvidiaPolicy::from_toml("[nvidia]\nrim = 1\n").is_err());
    assert!(NvidiaPolicy::from_toml("[other]\n").is_err());
    let big = format!(
        "[nvidia]\nallowed_driver_versions = [{}]\n",
        vec!["\"1\""; MAX_POLICY_VERSIONS + 1].join(",")
    );
    assert!(NvidiaPolicy::from_toml(&big).is_err());
}
