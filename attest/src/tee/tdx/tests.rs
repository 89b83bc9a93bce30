//! Tests on the genuine Intel-signed quote (attest/tests/fixtures/tdx/) and
//! on quotes built here with generated keys and a generated chain.

use std::str::FromStr as _;
use std::time::{Duration, UNIX_EPOCH};

use der::asn1::{BitString, OctetString, UtcTime};
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::SigningKey;
use p256::pkcs8::EncodePublicKey as _;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::ext::pkix::KeyUsages;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::{TbsCertificate, Version};

use super::*;

const GENUINE_HEX: &str = include_str!("../../../tests/fixtures/tdx/tdx-quote.hex");

fn genuine() -> Vec<u8> {
    let h = GENUINE_HEX.trim();
    hex::decode(h.strip_prefix("0x").unwrap_or(h)).unwrap()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2025-06-01: inside the genuine chain's validity (leaf 2024-08-02 to
/// 2031-08-02).
fn now() -> SystemTime {
    at(1_748_736_000)
}

// Offsets in the genuine quote.
const SIG: usize = 636;
const AK: usize = 700;
const QE_REPORT: usize = 770;
const QE_SIG: usize = 1154;
const AUTH_LEN: usize = 1218;
const PEM: usize = 1258;
const END_SIG_DATA: usize = 4936;

const MRTD: &str = "7ba9e262ce6979087e34632603f354dd8f8a870f5947d116af8114db6c9d0d74c48bec4280e5b4f4a37025a10905bb29";
const RTMR0: &str = "4574c098915caf3e82057817dbd135c1ed0ee1b39ac300c921479e2f5ebf5726a13ee0c8745ac891b6aee7c4f9664610";
const RTMR3: &str = "547fcba4630bfb981169a8a1903b79c244933413409dd0387acbd8e3b985bcc9164cf52735cd31f60bf2c5d1220c113f";
const MRSEAM: &str = "1cc6a17ab799e9a693fac7536be61c12ee1e0fabada82d0c999e08ccee2aa86de77b0870f558c570e7ffe55d6d47fa04";

#[test]
fn genuine_parses() {
    let b = genuine();
    assert_eq!(b.len(), 5006);
    let q = parse_quote(&b).unwrap();
    assert_eq!(q.header.version, 4);
    assert_eq!(q.header.attestation_key_type, 2);
    assert_eq!(q.header.tee_type, 0x81);
    assert_eq!(q.header.qe_vendor_id, INTEL_QE_VENDOR_ID);
    assert_eq!(hex::encode(q.report.mrtd), MRTD);
    assert_eq!(hex::encode(q.report.rtmr[0]), RTMR0);
    assert_eq!(q.report.rtmr[1], [0; 48]);
    assert_eq!(q.report.rtmr[2], [0; 48]);
    assert_eq!(hex::encode(q.report.rtmr[3]), RTMR3);
    assert_eq!(hex::encode(q.report.mrseam), MRSEAM);
    assert_eq!(
        hex::encode(q.report.tee_tcb_svn),
        "05010200000000000000000000000000"
    );
    assert_eq!(hex::encode(q.report.td_attributes), "0000001000000000");
    assert!(!q.report.debug());
    assert_eq!(hex::encode(q.report.xfam), "e702060000000000");
    assert_eq!(q.report.mrconfigid, [0; 48]);
    assert_eq!(hex::encode(&q.report.report_data[..8]), "7148f47ef58b475f");
    assert_eq!(q.qe_auth_data.len(), 32);
    assert_eq!(q.pck_chain.len(), 3);
    assert_eq!(common_name(&q.pck_chain[0]).unwrap(), LEAF_CN);
    assert_eq!(
        common_name(&q.pck_chain[1]).unwrap(),
        "Intel SGX PCK Platform CA"
    );
    assert_eq!(common_name(&q.pck_chain[2]).unwrap(), "Intel SGX Root CA");
}

#[test]
fn pinned_root_is_intel_sgx_root_ca() {
    let root = intel_sgx_root_ca().unwrap();
    let der = root.to_der().unwrap();
    assert_eq!(hex::encode(Sha256::digest(&der)), INTEL_SGX_ROOT_CA_SHA256);
    assert_eq!(common_name(&root).unwrap(), "Intel SGX Root CA");
    let key = p256_key_of(&root).unwrap();
    assert_eq!(
        hex::encode(key.to_encoded_point(false).as_bytes()),
        "040ba9c4c0c0c86193a3fe23d6b02cda10a8bbd4e88e48b4458561a36e705525f5\
         67918e2edc88e40d860bd0cc4ee26aacc988e505a953558c453f6b0904ae7394"
    );
    // The genuine chain carries this very certificate.
    let q = parse_quote(&genuine()).unwrap();
    assert_eq!(q.pck_chain[2].to_der().unwrap(), der);
}

#[test]
fn genuine_verifies() {
    let q = parse_quote(&genuine()).unwrap();
    let v = verify_quote(&q, now()).unwrap();
    assert_eq!(hex::encode(v.report.mrtd), MRTD);
    assert!(v.pck_subject.contains("Intel SGX PCK Certificate"));
    assert_eq!(v.pck_serial, "00b4794c84fdfbd9ec075053675b2b5d0e256f0441");
    // Intel's TD QE signed it: the pinned identity matches a genuine quote.
    assert_eq!(v.qe_isvsvn, 6);
    let s = v.summary();
    assert!(s.contains(&format!("mrtd={MRTD}")) && s.contains(&format!("rtmr3={RTMR3}")));
}

fn refused(bytes: &[u8]) -> bool {
    match parse_quote(bytes) {
        Err(_) => true,
        Ok(q) => verify_quote(&q, now()).is_err(),
    }
}

#[test]
fn every_flipped_byte_of_header_body_signature_key_and_qe_data_is_refused() {
    let b = genuine();
    // Header, TD report, signature length, quote signature, attestation
    // key, certification data header, QE report, its signature, QE auth
    // data and the nested header: every byte.
    for i in 0..PEM {
        let mut m = b.clone();
        m[i] ^= 0x01;
        assert!(refused(&m), "flip at {i} still verifies");
    }
    // The trailing padding must stay zero.
    for i in END_SIG_DATA..b.len() {
        let mut m = b.clone();
        m[i] = 1;
        assert_eq!(parse_quote(&m).unwrap_err(), TdxError::TrailingData);
    }
}

#[test]
fn specific_flips_fail_where_expected() {
    let b = genuine();
    let flip = |i: usize| {
        let mut m = b.clone();
        m[i] ^= 0x80;
        let q = parse_quote(&m)?;
        verify_quote(&q, now()).map(|_| ())
    };
    assert_eq!(flip(48 + 136), Err(TdxError::QuoteSignature)); // MRTD
    assert_eq!(flip(SIG + 33), Err(TdxError::QuoteSignature));
    assert_eq!(flip(QE_REPORT + 320), Err(TdxError::QeReportData));
    assert_eq!(flip(QE_REPORT + 10), Err(TdxError::QeReportSignature));
    assert_eq!(flip(QE_SIG + 40), Err(TdxError::QeReportSignature));
    assert_eq!(flip(AUTH_LEN + 2), Err(TdxError::QeReportData));
    assert!(matches!(
        flip(AK + 5),
        Err(TdxError::QuoteSignature | TdxError::BadKey(_))
    ));
    assert_eq!(flip(0), Err(TdxError::Version(0x84)));
}

#[test]
fn pem_chain_flips_are_refused_or_harmless() {
    // A base64 flip may land in padding bits; what matters is that no flip
    // yields a different chain that verifies.
    let b = genuine();
    let original = parse_quote(&b).unwrap().pck_chain;
    for i in (PEM..END_SIG_DATA).step_by(7) {
        let mut m = b.clone();
        m[i] ^= 0x01;
        if let Ok(q) = parse_quote(&m) {
            if verify_quote(&q, now()).is_ok() {
                assert_eq!(q.pck_chain, original, "flip at {i}");
            }
        }
    }
}

#[test]
fn validity_is_checked_against_now() {
    let q = parse_quote(&genuine()).unwrap();
    let early = verify_quote(&q, at(1_704_067_200)).unwrap_err(); // 2024-01-01
    assert!(early.to_string().contains("not valid until"), "{early}");
    let late = verify_quote(&q, at(1_945_987_200)).unwrap_err(); // 2031-09-01
    assert!(late.to_string().contains("expired"), "{late}");
}

#[test]
fn truncated_oversize_and_garbage_are_errors() {
    let b = genuine();
    for n in 0..END_SIG_DATA {
        assert!(parse_quote(&b[..n]).is_err(), "prefix {n} parses");
    }
    // Shorter padding is fine: it is not part of the quote.
    for n in END_SIG_DATA..=b.len() {
        assert!(parse_quote(&b[..n]).is_ok());
    }
    let mut big = b.clone();
    big.resize(MAX_QUOTE + 1, 0);
    assert_eq!(parse_quote(&big), Err(TdxError::TooLarge(MAX_QUOTE + 1)));
    let mut ok_padded = b.clone();
    ok_padded.resize(MAX_QUOTE, 0);
    assert!(parse_quote(&ok_padded).is_ok());

    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..2000 {
        let len = (next() % 6000) as usize;
        let g: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        assert!(parse_quote(&g).is_err());
        // Genuine prefix with garbage after it, and random mutations.
        let mut m = b.clone();
        for _ in 0..(next() % 8 + 1) {
            let i = (next() as usize) % m.len();
            m[i] = next() as u8;
        }
        let _ = parse_quote(&m).map(|q| verify_quote(&q, now()));
    }
}

fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn unknown_versions_types_and_bad_lengths_are_refused() {
    let b = genuine();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut m = b.clone();
        f(&mut m);
        parse_quote(&m).unwrap_err()
    };
    assert_eq!(with(&|m| set_u16(m, 0, 5)), TdxError::Version(5));
    assert_eq!(with(&|m| set_u16(m, 0, 3)), TdxError::Version(3));
    assert_eq!(with(&|m| set_u16(m, 2, 3)), TdxError::KeyType(3));
    assert_eq!(with(&|m| set_u32(m, 4, 0)), TdxError::TeeType(0));
    assert!(matches!(with(&|m| m[12] ^= 1), TdxError::QeVendor(_)));
    assert_eq!(
        with(&|m| set_u16(m, AK + 64, 5)),
        TdxError::CertDataType {
            found: 5,
            expected: 6
        }
    );
    assert_eq!(
        with(&|m| set_u16(m, PEM - 6, 4)),
        TdxError::CertDataType {
            found: 4,
            expected: 5
        }
    );
    // Signature data length one short: the certification data no longer
    // fits; one long: it runs into the (zero) padding, which then is left
    // over inside the signature data.
    assert!(matches!(
        with(&|m| set_u32(m, 632, 4299)),
        TdxError::Truncated(_)
    ));
    assert_eq!(
        with(&|m| set_u32(m, 632, 4301)),
        TdxError::Length("signature data")
    );
    assert_eq!(
        with(&|m| set_u32(m, 632, u32::MAX)),
        TdxError::Truncated("signature data")
    );
    assert_eq!(
        with(&|m| set_u32(m, AK + 66, 4167)),
        TdxError::Truncated("certification data")
    );
    assert_eq!(
        with(&|m| set_u32(m, PEM - 4, 3677)),
        TdxError::Length("qe report certification data")
    );
    // Text in place of a PEM certificate.
    assert!(matches!(with(&|m| m[PEM] = b'x'), TdxError::Pem(_)));
}

// ---- Quotes built here, with generated keys and a generated chain. ----

const ROOT_DN: &str = "CN=Intel SGX Root CA,O=Intel Corporation,L=Santa Clara,ST=CA,C=US";
const CA_DN: &str = "CN=Intel SGX PCK Platform CA,O=Intel Corporation,L=Santa Clara,ST=CA,C=US";
const LEAF_DN: &str = "CN=Intel SGX PCK Certificate,O=Intel Corporation,L=Santa Clara,ST=CA,C=US";

/// 2030-01-01, inside the built chain's validity (2020 to 2040).
fn synth_now() -> SystemTime {
    at(1_893_456_000)
}

fn key() -> SigningKey {
    SigningKey::random(&mut rand_core::OsRng)
}

fn ext(oid: der::asn1::ObjectIdentifier, value: &impl Encode) -> Extension {
    Extension {
        extn_id: oid,
        critical: true,
        extn_value: OctetString::new(value.to_der().unwrap()).unwrap(),
    }
}

fn make_cert(
    subject: &str,
    issuer: &str,
    key: &VerifyingKey,
    signer: &SigningKey,
    ca: bool,
    serial: u8,
) -> Certificate {
    let alg = AlgorithmIdentifierOwned {
        oid: ECDSA_WITH_SHA_256,
        parameters: None,
    };
    let spki_der = p256::PublicKey::from(key).to_public_key_der().unwrap();
    let usage = if ca {
        KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign)
    } else {
        KeyUsage(KeyUsages::DigitalSignature | KeyUsages::NonRepudiation)
    };
    let time = |s: u64| Time::UtcTime(UtcTime::from_unix_duration(Duration::from_secs(s)).unwrap());
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&[serial]).unwrap(),
        signature: alg.clone(),
        issuer: Name::from_str(issuer).unwrap(),
        validity: Validity {
            not_before: time(1_577_836_800),
            not_after: time(2_208_988_800),
        },
        subject: Name::from_str(subject).unwrap(),
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes()).unwrap(),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(vec![
            ext(
                ID_CE_BASIC_CONSTRAINTS,
                &BasicConstraints {
                    ca,
                    path_len_constraint: None,
                },
            ),
            ext(ID_CE_KEY_USAGE, &usage),
        ]),
    };
    let sig: Signature = signer.sign(&tbs.to_der().unwrap());
    Certificate {
        tbs_certificate: tbs,
        signature_algorithm: alg,
        signature: BitString::from_bytes(sig.to_der().as_bytes()).unwrap(),
    }
}

struct Synth {
    quote: Vec<u8>,
    root: Certificate,
}

/// Changes a QE report body.
type QeTweak = fn(&mut [u8]);

#[derive(Clone)]
struct Opts {
    report_data: [u8; 64],
    td_attributes: u64,
    ca_is_ca: bool,
    include_root: bool,
    /// Applied to the QE report after it is filled in as Intel's TD QE.
    qe_tweak: QeTweak,
}

fn opts(binding: &[u8; 32]) -> Opts {
    Opts {
        report_data: report_data_for(binding),
        td_attributes: 0x1000_0000,
        ca_is_ca: true,
        include_root: true,
        qe_tweak: |_| {},
    }
}

/// A QE report body as Intel's TD QE signs it (the genuine fixture's
/// values: attributes 0x15, ISVSVN 6).
fn intel_qe(qe: &mut [u8]) {
    qe[48] = 0x15;
    qe[128..160].copy_from_slice(&TD_QE_MRSIGNER);
    qe[256..258].copy_from_slice(&TD_QE_ISVPRODID.to_le_bytes());
    qe[258..260].copy_from_slice(&6u16.to_le_bytes());
}

fn pem(c: &Certificate) -> String {
    der::pem::encode_string(
        "CERTIFICATE",
        der::pem::LineEnding::LF,
        &c.to_der().unwrap(),
    )
    .unwrap()
}

fn synth(o: &Opts) -> Synth {
    let (root_k, ca_k, pck_k, ak) = (key(), key(), key(), key());
    let root = make_cert(ROOT_DN, ROOT_DN, root_k.verifying_key(), &root_k, true, 1);
    let ca = make_cert(CA_DN, ROOT_DN, ca_k.verifying_key(), &root_k, o.ca_is_ca, 2);
    let leaf = make_cert(LEAF_DN, CA_DN, pck_k.verifying_key(), &ca_k, false, 3);

    let mut q = vec![4, 0, 2, 0, 0x81, 0, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(&INTEL_QE_VENDOR_ID);
    q.extend_from_slice(&[0; 20]);
    q.extend_from_slice(&[3; 16]); // TEE_TCB_SVN
    q.extend_from_slice(&[0x5e; 48]); // MRSEAM
    q.extend_from_slice(&[0; 48 + 8]); // MRSIGNERSEAM, SEAMATTRIBUTES
    q.extend_from_slice(&o.td_attributes.to_le_bytes());
    q.extend_from_slice(&0xe7u64.to_le_bytes()); // XFAM
    q.extend_from_slice(&[0x11; 48]); // MRTD
    q.extend_from_slice(&[0x22; 48]); // MRCONFIGID
    q.extend_from_slice(&[0; 96]); // MROWNER, MROWNERCONFIG
    for i in 0..4u8 {
        q.extend_from_slice(&[0x30 + i; 48]);
    }
    q.extend_from_slice(&o.report_data);
    assert_eq!(q.len(), HEADER_LEN + TD_REPORT_LEN);

    let sig: Signature = ak.sign(&q);
    let ak_xy = ak.verifying_key().to_encoded_point(false).as_bytes()[1..].to_vec();
    let auth: Vec<u8> = (0u8..32).collect();
    let mut qe = vec![0u8; QE_REPORT_LEN];
    intel_qe(&mut qe);
    (o.qe_tweak)(&mut qe);
    let mut h = Sha256::new();
    h.update(&ak_xy);
    h.update(&auth);
    qe[320..352].copy_from_slice(&h.finalize());
    let qe_sig: Signature = pck_k.sign(&qe);

    let mut chain = pem(&leaf) + &pem(&ca);
    if o.include_root {
        chain += &pem(&root);
    }
    let mut nested = chain.into_bytes();
    nested.push(0);

    let mut cd = qe;
    cd.extend_from_slice(&qe_sig.to_bytes());
    cd.extend_from_slice(&(auth.len() as u16).to_le_bytes());
    cd.extend_from_slice(&auth);
    cd.extend_from_slice(&5u16.to_le_bytes());
    cd.extend_from_slice(&(nested.len() as u32).to_le_bytes());
    cd.extend_from_slice(&nested);

    let mut sd = sig.to_bytes().to_vec();
    sd.extend_from_slice(&ak_xy);
    sd.extend_from_slice(&6u16.to_le_bytes());
    sd.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    sd.extend_from_slice(&cd);

    q.extend_from_slice(&(sd.len() as u32).to_le_bytes());
    q.extend_from_slice(&sd);
    Synth { quote: q, root }
}

fn synth_policy() -> TdxPolicy {
    TdxPolicy {
        allowed_mrtd: vec!["11".repeat(48)],
        min_tee_tcb_svn: Some("00".repeat(16)),
        ..TdxPolicy::default()
    }
}

fn evidence(quote: &[u8]) -> serde_json::Value {
    serde_json::to_value(TdxEvidence::new(quote)).unwrap()
}

#[test]
fn built_quote_verifies_with_its_root_and_binding() {
    let binding = [9u8; 32];
    let s = synth(&opts(&binding));
    let msg = verify_evidence_with_root(
        &evidence(&s.quote),
        &binding,
        &synth_policy(),
        synth_now(),
        &s.root,
    )
    .unwrap();
    assert!(msg.contains(&format!("mrtd={}", "11".repeat(48))), "{msg}");
    assert!(msg.contains(&format!("rtmr2={}", "32".repeat(48))), "{msg}");
    assert!(msg.contains("tcb status and revocation not checked"));
    // Also without the root in the carried chain.
    let s = synth(&Opts {
        include_root: false,
        ..opts(&binding)
    });
    verify_evidence_with_root(
        &evidence(&s.quote),
        &binding,
        &synth_policy(),
        synth_now(),
        &s.root,
    )
    .unwrap();
}

/// Verifies a synthetic quote whose QE report `tweak` changed.
fn verify_with_qe(binding: &[u8; 32], tweak: QeTweak) -> Result<String, TdxError> {
    let s = synth(&Opts {
        qe_tweak: tweak,
        ..opts(binding)
    });
    verify_evidence_with_root(
        &evidence(&s.quote),
        binding,
        &synth_policy(),
        synth_now(),
        &s.root,
    )
}

#[test]
fn a_quoting_enclave_other_than_intels_td_qe_is_refused() {
    let binding = [9u8; 32];
    // An empty expectation: still Intel's QE.
    let cases: [(QeTweak, &str); 7] = [
        (|qe| qe[128..160].fill(0), "mrsigner 0000"),
        (|qe| qe[160] ^= 1, ""), // outside the identity
        (|qe| qe[256] = 1, "isvprodid 1, not 2"),
        (|qe| qe[48] |= 0x02, "(debug)"),
        (|qe| qe[16] = 1, "miscselect 01000000"),
        (|qe| qe[49] = 1, "attributes 1501"),
        // The attributes mask leaves bit 2 out (the genuine QE has it set).
        (|qe| qe[48] ^= 0x04, ""),
    ];
    for (tweak, want) in cases {
        let res = verify_with_qe(&binding, tweak);
        if want.is_empty() {
            res.unwrap();
            continue;
        }
        match res.unwrap_err() {
            TdxError::QeIdentity(m) => assert!(m.contains(want), "{m} lacks {want}"),
            e => panic!("expected a QE identity refusal, got {e}"),
        }
    }
}

#[test]
fn a_quoting_enclave_below_the_minimum_svn_is_refused() {
    let binding = [9u8; 32];
    let s = synth(&Opts {
        qe_tweak: |qe| qe[258..260].copy_from_slice(&3u16.to_le_bytes()),
        ..opts(&binding)
    });
    let verify = |policy: &TdxPolicy| {
        verify_evidence_with_root(&evidence(&s.quote), &binding, policy, synth_now(), &s.root)
    };
    let e = verify(&synth_policy()).unwrap_err();
    assert!(
        e.to_string()
            .contains("quoting enclave isvsvn 3 is below the minimum 4"),
        "{e}"
    );
    let lower = TdxPolicy {
        min_qe_isvsvn: Some(3),
        ..synth_policy()
    };
    assert!(verify(&lower).unwrap().contains("qe_isvsvn=3"));
    let higher = TdxPolicy {
        min_qe_isvsvn: Some(7),
        ..synth_policy()
    };
    // The genuine QE's 6 is below 7 too.
    let s6 = synth(&opts(&binding));
    let e = verify_evidence_with_root(
        &evidence(&s6.quote),
        &binding,
        &higher,
        synth_now(),
        &s6.root,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("isvsvn 6 is below the minimum 7"),
        "{e}"
    );
}

#[test]
fn a_chain_to_another_root_is_refused() {
    let binding = [9u8; 32];
    for include_root in [true, false] {
        let s = synth(&Opts {
            include_root,
            ..opts(&binding)
        });
        // The public entry points pin Intel's root.
        let q = parse_quote(&s.quote).unwrap();
        let e = verify_quote(&q, synth_now()).unwrap_err();
        assert!(e.to_string().contains("pinned intel sgx root ca"), "{e}");
        let e = verify_evidence(&evidence(&s.quote), &binding, &synth_policy(), synth_now())
            .unwrap_err();
        assert!(e.contains("pinned intel sgx root ca"), "{e}");
        // And the genuine chain does not verify under the generated root.
        let g = parse_quote(&genuine()).unwrap();
        let e = verify_quote_with_root(&g, now(), &s.root).unwrap_err();
        assert!(matches!(e, TdxError::Chain(_)), "{e}");
    }
}

#[test]
fn an_issuer_that_is_not_a_ca_is_refused() {
    let binding = [9u8; 32];
    let s = synth(&Opts {
        ca_is_ca: false,
        ..opts(&binding)
    });
    let q = parse_quote(&s.quote).unwrap();
    let e = verify_quote_with_root(&q, synth_now(), &s.root).unwrap_err();
    assert!(e.to_string().contains("is not a ca"), "{e}");
}

#[test]
fn report_data_must_be_the_binding() {
    let binding = [9u8; 32];
    let s = synth(&opts(&binding));
    let e = verify_evidence_with_root(
        &evidence(&s.quote),
        &[8; 32],
        &synth_policy(),
        synth_now(),
        &s.root,
    )
    .unwrap_err();
    assert!(e.to_string().contains("is not the binding"), "{e}");
    // The binding in the first half and non-zero second half: refused.
    let mut rd = report_data_for(&binding);
    rd[63] = 1;
    let s = synth(&Opts {
        report_data: rd,
        ..opts(&binding)
    });
    let e = verify_evidence_with_root(
        &evidence(&s.quote),
        &binding,
        &synth_policy(),
        synth_now(),
        &s.root,
    )
    .unwrap_err();
    assert!(e.to_string().contains("is not the binding"), "{e}");
    // The genuine quote verifies to Intel's root but is bound to someone
    // else's data.
    let p = TdxPolicy {
        allowed_mrtd: vec![MRTD.into()],
        allow_any_tcb: true,
        ..TdxPolicy::default()
    };
    let e = verify_evidence(&evidence(&genuine()), &[0; 32], &p, now()).unwrap_err();
    assert!(e.contains("is not the binding"), "{e}");
}

#[test]
fn a_debug_td_is_refused_unless_allowed() {
    let binding = [9u8; 32];
    let s = synth(&Opts {
        td_attributes: 1,
        ..opts(&binding)
    });
    let ev = evidence(&s.quote);
    let e = verify_evidence_with_root(&ev, &binding, &synth_policy(), synth_now(), &s.root)
        .unwrap_err();
    assert!(e.to_string().contains("debuggable"), "{e}");
    let allow = TdxPolicy {
        allow_debug: true,
        ..synth_policy()
    };
    verify_evidence_with_root(&ev, &binding, &allow, synth_now(), &s.root).unwrap();
}

#[test]
fn policy_checks_each_refuse_the_genuine_quote() {
    let q = parse_quote(&genuine()).unwrap();
    let v = verify_quote(&q, now()).unwrap();
    let base = TdxPolicy {
        allowed_mrtd: vec![MRTD.to_uppercase()],
        expected_rtmr: Some(BTreeMap::from([
            ("0".to_string(), RTMR0.to_string()),
            ("3".to_string(), RTMR3.to_string()),
        ])),
        allowed_mrconfigid: Some(vec!["00".repeat(48)]),
        allow_debug: false,
        min_tee_tcb_svn: Some("05010200000000000000000000000000".into()),
        allow_any_tcb: false,
        allowed_mrseam: Some(vec![MRSEAM.into()]),
        min_qe_isvsvn: Some(6),
    };
    base.check(&v).unwrap();
    let refuse = |p: TdxPolicy, want: &str| {
        let e = p.check(&v).unwrap_err().to_string();
        assert!(e.contains(want), "{e} lacks {want:?}");
    };
    refuse(
        TdxPolicy {
            allowed_mrtd: vec![],
            ..base.clone()
        },
        "allowed_mrtd is empty",
    );
    refuse(
        TdxPolicy {
            min_qe_isvsvn: Some(7),
            ..base.clone()
        },
        "quoting enclave isvsvn 6 is below the minimum 7",
    );
    refuse(
        TdxPolicy {
            allowed_mrtd: vec!["00".repeat(48)],
            ..base.clone()
        },
        "mrtd 7ba9",
    );
    refuse(
        TdxPolicy {
            expected_rtmr: Some(BTreeMap::from([("1".to_string(), RTMR0.to_string())])),
            ..base.clone()
        },
        "rtmr1 is 0000",
    );
    refuse(
        TdxPolicy {
            allowed_mrconfigid: Some(vec!["01".repeat(48)]),
            ..base.clone()
        },
        "mrconfigid",
    );
    refuse(
        TdxPolicy {
            allowed_mrseam: Some(vec!["01".repeat(48)]),
            ..base.clone()
        },
        "mrseam",
    );
    refuse(
        TdxPolicy {
            min_tee_tcb_svn: Some("05020000000000000000000000000000".into()),
            ..base.clone()
        },
        "below the minimum",
    );
    let mut debug = v.clone();
    debug.report.td_attributes[0] |= 1;
    let e = base.check(&debug).unwrap_err().to_string();
    assert!(e.contains("debuggable"), "{e}");
    TdxPolicy {
        allow_debug: true,
        ..base.clone()
    }
    .check(&debug)
    .unwrap();
    // No minimum TDX module SVN: refused unless any is accepted.
    let mut any = TdxPolicy {
        min_tee_tcb_svn: None,
        ..base.clone()
    };
    let e = any.check(&v).unwrap_err().to_string();
    assert!(e.contains("sets no min_tee_tcb_svn"), "{e}");
    any.allow_any_tcb = true;
    any.check(&v).unwrap();
}

#[test]
fn policy_from_a_tdx_table() {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        tdx: TdxPolicy,
    }
    let text = format!(
        "[tdx]\nallowed_mrtd = [\"{MRTD}\"]\nmin_tee_tcb_svn = \"{}\"\n[tdx.expected_rtmr]\n0 = \"{RTMR0}\"\n",
        "00".repeat(16)
    );
    let d: Doc = toml::from_str(&text).unwrap();
    d.tdx.validate().unwrap();
    assert!(!d.tdx.allow_debug);
    assert_eq!(d.tdx.expected_rtmr.as_ref().unwrap()["0"], RTMR0);
    let inner = text.replace("[tdx]\n", "").replace("[tdx.", "[");
    assert_eq!(TdxPolicy::from_toml(&inner).unwrap(), d.tdx);
    // Malformed values and unknown keys are refused at load.
    for bad in [
        "allowed_mrtd = [\"00\"]",
        "allowed_mrtd = []\nmin_tee_tcb_svn = \"00\"",
        "allowed_mrtd = []\n[expected_rtmr]\n4 = \"00\"",
        "allowed_mrtd = []\nallowed_mrseam = [\"zz\"]",
        "allowed_mrtd = []\nallow_dbg = true",
    ] {
        assert!(TdxPolicy::from_toml(bad).is_err(), "{bad}");
    }
}

#[test]
fn evidence_document_is_strict() {
    let p = synth_policy();
    let e = verify_evidence(
        &serde_json::json!({"quote": "AAAA", "x": 1}),
        &[0; 32],
        &p,
        now(),
    )
    .unwrap_err();
    assert!(e.contains("malformed tdx evidence"), "{e}");
    let e = verify_evidence(&serde_json::json!({"quote": "!!"}), &[0; 32], &p, now()).unwrap_err();
    assert!(e.contains("not base64"), "{e}");
    let e = verify_evidence(&serde_json::json!(null), &[0; 32], &p, now()).unwrap_err();
    assert!(e.contains("malformed tdx evidence"), "{e}");
    let huge = "A".repeat(MAX_QUOTE_BASE64 + 4);
    let e =
        verify_evidence(&serde_json::json!({ "quote": huge }), &[0; 32], &p, now()).unwrap_err();
    assert!(e.contains("exceeds the limit"), "{e}");
    let e =
        verify_evidence(&serde_json::json!({"quote": "AAAA"}), &[0; 32], &p, now()).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
}
