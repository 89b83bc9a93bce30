//! Unit tests for the SEV-SNP verifier, on the genuine Milan report in
//! attest/tests/fixtures/snp-milan (see its README) and on built structures.

use std::time::{Duration, SystemTime};

use super::*;

const REPORT_HEX: &str = include_str!("../../../tests/fixtures/snp-milan/report_milan.hex");
const VCEK: &[u8] = include_bytes!("../../../tests/fixtures/snp-milan/vcek_milan.der");
const CHAIN: &str = include_str!("../../../tests/fixtures/snp-milan/cert_chain_milan");

const MEASUREMENT: &str = "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f";

/// 2024-01-01: inside every fixture certificate's validity.
fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200)
}

fn raw() -> Vec<u8> {
    hex::decode(REPORT_HEX.trim()).unwrap()
}

fn report() -> SnpReport {
    parse_report(&raw()).unwrap()
}

fn chain() -> (Vec<u8>, Vec<u8>) {
    let (ask, ark) = split_chain(CHAIN.as_bytes()).unwrap();
    (ask.unwrap(), ark.unwrap())
}

fn ek() -> EndorsementCert {
    EndorsementCert::from_bytes(VCEK).unwrap()
}

fn pem_der(pem: &str) -> Vec<u8> {
    der::pem::decode_vec(pem.as_bytes()).unwrap().1
}

#[test]
fn pinned_certificates() {
    let expected = [
        (
            Generation::Milan,
            "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
            "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        ),
        (
            Generation::Genoa,
            "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
            "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        ),
        (
            Generation::Turin,
            "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
            "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        ),
    ];
    for (g, ark_sha, ask_sha) in expected {
        let ark = pinned_ark(g);
        let ask = builtin_ask(g);
        assert_eq!(sha256_hex(&ark.der), ark_sha, "{g} ARK");
        assert_eq!(sha256_hex(&ask.der), ask_sha, "{g} ASK");
        assert_eq!(ark.common_name().unwrap(), format!("ARK-{g}"));
        assert_eq!(ask.common_name().unwrap(), format!("SEV-{g}"));
        ark.signed_by(&ark).unwrap();
        ask.signed_by(&ark).unwrap();
        assert!(ask.is_ca() && ark.is_ca());
        assert_eq!(
            Generation::from_product(&ark.common_name().unwrap()),
            Some(g)
        );
    }
    // The fixture's chain is the pinned Milan pair.
    let (ask, ark) = chain();
    assert_eq!(ark, pem_der(certs::ARK_MILAN));
    assert_eq!(ask, pem_der(certs::ASK_MILAN));
}

#[test]
fn parses_the_genuine_report() {
    let r = report();
    assert_eq!(r.version, 2);
    assert_eq!(r.guest_svn, 0);
    assert_eq!(r.vmpl, 0);
    assert_eq!(r.signature_algo, 1);
    assert_eq!(r.policy.0, 0x30000);
    assert!(r.policy.smt());
    assert!(!r.policy.debug() && !r.policy.migrate_ma() && !r.policy.single_socket());
    assert_eq!((r.policy.abi_major(), r.policy.abi_minor()), (0, 0));
    assert_eq!(r.platform_info.0, 1);
    assert!(r.platform_info.smt_enabled() && !r.platform_info.tsme_enabled());
    assert!(!r.key_info.author_key_en() && !r.key_info.mask_chip_key());
    assert_eq!(r.key_info.signing_key(), SigningKey::Vcek);
    assert_eq!(hex::encode(r.measurement), MEASUREMENT);
    assert!(hex::encode(r.report_data).starts_with("d447b55d197491bf"));
    assert!(hex::encode(r.chip_id).starts_with("d49554ec717f4e5b0fe6b143bcf0405b"));
    assert_eq!(r.report_id_ma, [0xff; 32]);
    assert_eq!(r.family_id, [0; 16]);
    assert_eq!(r.cpuid, None);
    assert_eq!(r.generation, None);
    assert_eq!(r.tcb_layout, TcbLayout::Legacy);
    let t = r.reported_tcb;
    assert_eq!(
        (t.bootloader, t.tee, t.snp, t.microcode, t.fmc),
        (3, 0, 8, 115, None)
    );
    assert_eq!(t.raw, [3, 0, 0, 0, 0, 0, 8, 0x73]);
    assert_eq!(r.current_tcb, t);
    assert_eq!(r.committed_tcb, t);
    assert_eq!(r.launch_tcb, t);
    assert_eq!(r.current_version.to_string(), "1.52 build 4");
    assert_eq!(r.committed_version, r.current_version);
    assert_eq!(r.launch_mit_vector, None);
    assert!(hex::encode(r.signature_r).starts_with("61ab4f11"));
    assert!(hex::encode(r.signature_s).starts_with("209d7eb9"));
    assert_eq!(r.to_json()["measurement"], MEASUREMENT);
    // The VCEK's side.
    let e = ek();
    assert_eq!(e.kind, EkKind::Vcek);
    assert_eq!(e.product_name.as_deref(), Some("Milan-B0"));
    assert_eq!(e.generation(), Some(Generation::Milan));
    assert_eq!(
        e.tcb,
        CertTcb {
            bootloader: 3,
            tee: 0,
            snp: 8,
            microcode: 115,
            fmc: None
        }
    );
    assert_eq!(e.hw_id.as_deref(), Some(&r.chip_id[..]));
}

#[test]
fn report_file_forms() {
    let bin = raw();
    assert_eq!(report_from_file_bytes(&bin).unwrap(), report());
    assert_eq!(
        report_from_file_bytes(REPORT_HEX.as_bytes()).unwrap(),
        report()
    );
    // Upper case and whitespace anywhere.
    let mut spaced = String::new();
    for (i, c) in REPORT_HEX.trim().chars().enumerate() {
        if i % 64 == 0 {
            spaced.push_str("\n  ");
        }
        if i % 2 == 0 {
            spaced.push(' ');
        }
        spaced.push(c.to_ascii_uppercase());
    }
    assert_eq!(report_from_file_bytes(spaced.as_bytes()).unwrap(), report());
    // Odd, short, long.
    let odd = &REPORT_HEX.trim()[1..];
    assert!(matches!(
        report_from_file_bytes(odd.as_bytes()),
        Err(SnpError::ReportFile(_))
    ));
    let short = &REPORT_HEX.trim()[2..];
    assert!(matches!(
        report_from_file_bytes(short.as_bytes()),
        Err(SnpError::ReportLength(1183))
    ));
    assert!(matches!(
        report_from_file_bytes(&vec![b'0'; MAX_REPORT_FILE + 1]),
        Err(SnpError::ReportFile(_))
    ));
    assert!(matches!(
        report_from_file_bytes(b""),
        Err(SnpError::ReportLength(0))
    ));
}

#[test]
fn malformed_reports_are_errors_not_panics() {
    let r = raw();
    for len in [0, 1, 4, SIGNED_LEN, REPORT_LEN - 1, REPORT_LEN + 1, 4096] {
        let mut b = r.clone();
        b.resize(len, 0);
        assert!(matches!(parse_report(&b), Err(SnpError::ReportLength(n)) if n == len));
    }
    for v in [0u32, 1, 4, 6, u32::MAX] {
        let mut b = r.clone();
        b[..4].copy_from_slice(&v.to_le_bytes());
        let e = parse_report(&b).unwrap_err();
        assert!(
            matches!(e, SnpError::UnsupportedVersion(x) if x == v),
            "{e}"
        );
        assert!(e.to_string().contains("versions 2, 3 and 5"));
    }
    // Garbage of the right length: a pseudo-random fill with a valid
    // version parses (every byte pattern is a report) and fails
    // verification cleanly.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut g = vec![0u8; REPORT_LEN];
    for b in g.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    for v in [2u32, 3, 5] {
        g[..4].copy_from_slice(&v.to_le_bytes());
        let p = parse_report(&g).unwrap();
        assert!(verify_report(&p, VCEK, None, None, now()).is_err());
        let _ = p.to_json();
    }
}

#[test]
fn versions_3_and_5_fields() {
    let mut b = raw();
    b[..4].copy_from_slice(&3u32.to_le_bytes());
    b[0x188..0x18B].copy_from_slice(&[0x19, 0x01, 0x01]);
    let r = parse_report(&b).unwrap();
    assert_eq!(
        r.cpuid,
        Some(Cpuid {
            family: 0x19,
            model: 1,
            stepping: 1
        })
    );
    assert_eq!(r.generation, Some(Generation::Milan));
    assert_eq!(r.launch_mit_vector, None);
    r.for_generation(Generation::Milan).unwrap();
    let e = r.for_generation(Generation::Genoa).unwrap_err();
    assert!(matches!(e, SnpError::GenerationMismatch(_)), "{e}");
    assert!(e.to_string().contains("is Milan"), "{e}");

    b[..4].copy_from_slice(&5u32.to_le_bytes());
    b[0x188..0x18B].copy_from_slice(&[0x1A, 0x02, 0x00]);
    b[0x180..0x188].copy_from_slice(&[1, 2, 3, 4, 0, 0, 0, 5]);
    b[0x1F8..0x200].copy_from_slice(&7u64.to_le_bytes());
    b[0x200..0x208].copy_from_slice(&9u64.to_le_bytes());
    let r = parse_report(&b).unwrap();
    assert_eq!(r.generation, Some(Generation::Turin));
    assert_eq!(r.tcb_layout, TcbLayout::Turin);
    let t = r.reported_tcb;
    assert_eq!(
        (t.fmc, t.bootloader, t.tee, t.snp, t.microcode),
        (Some(1), 2, 3, 4, 5)
    );
    assert_eq!(
        t.to_string(),
        "fmc 1, bootloader 2, tee 3, snp 4, microcode 5"
    );
    assert_eq!(
        (r.launch_mit_vector, r.current_mit_vector),
        (Some(7), Some(9))
    );
    // An unknown family-1Ah model still decodes with the Turin layout.
    b[0x189] = 0x70;
    let r = parse_report(&b).unwrap();
    assert_eq!((r.generation, r.tcb_layout), (None, TcbLayout::Turin));
}

#[test]
fn generations() {
    assert_eq!(Generation::from_cpuid(0x19, 0x01), Some(Generation::Milan));
    assert_eq!(Generation::from_cpuid(0x19, 0x11), Some(Generation::Genoa));
    assert_eq!(Generation::from_cpuid(0x19, 0xA0), Some(Generation::Genoa));
    assert_eq!(Generation::from_cpuid(0x1A, 0x02), Some(Generation::Turin));
    assert_eq!(Generation::from_cpuid(0x17, 0x31), None);
    assert_eq!(
        Generation::from_product("Milan-B0"),
        Some(Generation::Milan)
    );
    assert_eq!(
        Generation::from_product("SEV-VLEK-Genoa"),
        Some(Generation::Genoa)
    );
    assert_eq!(Generation::from_product("Venice"), None);
    let legacy = TcbVersion::decode([1, 2, 9, 9, 9, 9, 3, 4], TcbLayout::Legacy);
    assert_eq!(
        (legacy.bootloader, legacy.tee, legacy.snp, legacy.microcode),
        (1, 2, 3, 4)
    );
    assert_eq!(
        legacy.as_u64(),
        u64::from_le_bytes([1, 2, 9, 9, 9, 9, 3, 4])
    );
}

#[test]
fn the_genuine_report_verifies() {
    let (ask, ark) = chain();
    let r = report();
    let v = verify_report(&r, VCEK, Some(&ask), Some(&ark), now()).unwrap();
    assert_eq!(v.generation, Generation::Milan);
    assert_eq!(v.signing_key, EkKind::Vcek);
    assert!(!v.chain.builtin_ask);
    assert_eq!(v.report.generation, Some(Generation::Milan));
    assert_eq!(v.details.len(), 4);
    // Without a chain: the built-in ASK and the pinned ARKs.
    let v = verify_report(&r, VCEK, None, None, now()).unwrap();
    assert!(v.chain.builtin_ask);
    assert!(v.details[0].contains("ARK-Milan"), "{:?}", v.details);
    // The ASK alone; PEM inputs.
    verify_report(&r, VCEK, Some(&ask), None, now()).unwrap();
    verify_report(
        &r,
        VCEK,
        Some(certs::ASK_MILAN.as_bytes()),
        Some(certs::ARK_MILAN.as_bytes()),
        now(),
    )
    .unwrap();
    check_chip_id(&r, &ek()).unwrap();
    check_tcb(&r, &ek()).unwrap();
    // The VCEK as PEM, with text around it.
    let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, VCEK).unwrap();
    let wrapped = format!("VCEK for chip d495\n\n{pem}\nend\n");
    assert_eq!(
        EndorsementCert::from_bytes(wrapped.as_bytes())
            .unwrap()
            .der(),
        VCEK
    );
    verify_report(&r, wrapped.as_bytes(), None, None, now()).unwrap();
}

#[test]
fn certificate_validity() {
    let (ask, ark) = chain();
    // The VCEK is valid from 2023-04-03 to 2030-04-03.
    for t in [1_600_000_000u64, 1_950_000_000] {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(t);
        let e = verify_report(&report(), VCEK, Some(&ask), Some(&ark), at).unwrap_err();
        assert!(matches!(e, SnpError::CertificateNotValid { .. }), "{e}");
        assert!(e.to_string().contains("valid from"), "{e}");
    }
}

#[test]
fn wrong_chains_are_refused() {
    let (ask, ark) = chain();
    let genoa_ask = pem_der(certs::ASK_GENOA);
    let genoa_ark = pem_der(certs::ARK_GENOA);
    let r = report();
    // Genoa's ASK and ARK: a fine chain, but not the VCEK's.
    let e = verify_report(&r, VCEK, Some(&genoa_ask), Some(&genoa_ark), now()).unwrap_err();
    assert!(matches!(e, SnpError::VcekNotSignedByAsk { .. }), "{e}");
    assert!(e.to_string().contains("SEV-Genoa"), "{e}");
    // Genoa's ASK alone: chains to the pinned ARK-Genoa, still not the VCEK's.
    let e = verify_report(&r, VCEK, Some(&genoa_ask), None, now()).unwrap_err();
    assert!(matches!(e, SnpError::VcekNotSignedByAsk { .. }), "{e}");
    // Milan's ASK with Genoa's ARK.
    let e = verify_report(&r, VCEK, Some(&ask), Some(&genoa_ark), now()).unwrap_err();
    assert!(matches!(e, SnpError::AskNotSignedByArk { .. }), "{e}");
    assert!(e.to_string().contains("ARK-Genoa"), "{e}");
    // An ARK that is not pinned (here: the ASK posing as one).
    let e = verify_report(&r, VCEK, Some(&ask), Some(&ask), now()).unwrap_err();
    assert!(matches!(e, SnpError::ArkNotPinned { .. }), "{e}");
    // The ARK as the ASK; the VCEK as the ASK.
    let e = verify_report(&r, VCEK, Some(&ark), None, now()).unwrap_err();
    assert!(
        matches!(e, SnpError::Certificate { which: "ASK", .. }),
        "{e}"
    );
    let e = verify_report(&r, VCEK, Some(VCEK), None, now()).unwrap_err();
    assert!(
        matches!(e, SnpError::Certificate { which: "ASK", .. }),
        "{e}"
    );
    // The ASK as the VCEK.
    let e = verify_report(&r, &ask, None, None, now()).unwrap_err();
    assert!(
        e.to_string().contains("neither SEV-VCEK nor SEV-VLEK"),
        "{e}"
    );
    // Garbage certificates.
    for bad in [
        &b""[..],
        b"\x30\x03\x02\x01\x00",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ] {
        assert!(matches!(
            verify_report(&r, bad, None, None, now()),
            Err(SnpError::Certificate { .. })
        ));
        assert!(matches!(
            verify_report(&r, VCEK, Some(bad), None, now()),
            Err(SnpError::Certificate { .. })
        ));
        assert!(matches!(
            verify_report(&r, VCEK, None, Some(bad), now()),
            Err(SnpError::Certificate { .. })
        ));
    }
    // A flipped byte in the VCEK's signed part breaks its certificate signature.
    let mut vcek = VCEK.to_vec();
    let at = vcek.len() / 2;
    vcek[at] ^= 1;
    if let Ok(e) = EndorsementCert::from_bytes(&vcek) {
        let err = verify_chain(&e, Some(&ask), Some(&ark), now()).unwrap_err();
        assert!(matches!(err, SnpError::VcekNotSignedByAsk { .. }), "{err}");
    }
}

/// Flips bit `mask` of byte `i` of the genuine report and checks the
/// signature check refuses it.
fn assert_flip_refused(good: &[u8], e: &EndorsementCert, i: usize, mask: u8) {
    let mut b = good.to_vec();
    b[i] ^= mask;
    let refused = parse_report(&b)
        .and_then(|r| r.for_generation(Generation::Milan))
        .and_then(|r| verify_signature(&r, e));
    assert!(
        refused.is_err(),
        "flipping byte {i:#05x} by {mask:#04x} went unnoticed"
    );
}

/// Through the whole verifier (chain included), a flipped byte in each
/// region of the report is refused; `every_flipped_byte_exhaustive` flips
/// every byte against the signature check.
#[test]
fn flipped_bytes_break_verification() {
    let good = raw();
    verify_signature(&report(), &ek()).unwrap();
    // Through the whole verifier, a few of them.
    let (ask, ark) = chain();
    for i in [
        0x000, 0x050, 0x090, 0x180, 0x1A0, 0x29F, 0x2A0, 0x2E8, 0x32F, 0x330, 0x49F,
    ] {
        let mut b = good.clone();
        b[i] ^= 0x01;
        let r = parse_report(&b);
        assert!(
            r.is_err() || verify_report(&r.unwrap(), VCEK, Some(&ask), Some(&ark), now()).is_err(),
            "byte {i:#05x}"
        );
    }
}

/// All 1184 bytes, each flipped by its low and its high bit (seconds, with
/// the crypto crates and this crate optimised in test builds: see the root
/// Cargo.toml).
#[test]
fn every_flipped_byte_exhaustive() {
    let good = raw();
    let e = ek();
    let start = std::time::Instant::now();
    for i in 0..REPORT_LEN {
        for mask in [0x01u8, 0x80] {
            assert_flip_refused(&good, &e, i, mask);
        }
    }
    eprintln!("{} flips refused in {:?}", 2 * REPORT_LEN, start.elapsed());
}

#[test]
fn signature_field_errors() {
    let e = ek();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = raw();
        f(&mut b);
        verify_signature(&parse_report(&b).unwrap(), &e).unwrap_err()
    };
    assert!(matches!(
        with(&|b| b[0x34] = 2),
        SnpError::UnsupportedSignatureAlgo(2)
    ));
    assert!(matches!(with(&|b| b[0x48] |= 2), SnpError::ReportNotSigned));
    let err = with(&|b| b[0x48] |= 1 << 2);
    assert!(matches!(err, SnpError::SigningKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("VLEK"), "{err}");
    assert!(matches!(
        with(&|b| b[0x48] |= 7 << 2),
        SnpError::SigningKeyMismatch { .. }
    ));
    assert!(matches!(
        with(&|b| b[0x2A0 + 50] = 1),
        SnpError::SignatureMalformed(_)
    ));
    assert!(matches!(
        with(&|b| b[0x2E8 + 71] = 1),
        SnpError::SignatureMalformed(_)
    ));
    let err = with(&|b| b[0x400] = 1);
    assert!(err.to_string().contains("reserved byte 0x400"), "{err}");
    assert!(matches!(
        with(&|b| b[0x2A0..0x2E8].fill(0)),
        SnpError::SignatureMalformed(_)
    ));
    // S = the group order (not below it).
    let n = hex::decode("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973").unwrap();
    let err = with(&|b| {
        for (k, v) in n.iter().rev().enumerate() {
            b[0x2E8 + k] = *v;
        }
    });
    assert!(matches!(err, SnpError::SignatureMalformed(_)), "{err}");
    assert!(matches!(
        with(&|b| b[0x100] ^= 1),
        SnpError::BadSignature(_)
    ));
}

/// A report from another chip: the VCEK's hwID cannot be changed without
/// AMD's key, so change the report's CHIP_ID instead. Both the signature
/// and the chip-id check then fail.
#[test]
fn chip_id_mismatch() {
    let mut b = raw();
    b[0x1A0] ^= 0xff;
    let r = parse_report(&b).unwrap();
    let e = ek();
    assert!(matches!(
        verify_signature(&r, &e),
        Err(SnpError::BadSignature(_))
    ));
    let err = check_chip_id(&r, &e).unwrap_err();
    assert!(matches!(err, SnpError::ChipIdMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&hex::encode(&b[0x1A0..0x1E0])),
        "{err}"
    );
    assert!(verify_report(&r, VCEK, None, None, now()).is_err());
    // Masked: not compared.
    b[0x1A0..0x1E0].fill(0);
    let r = parse_report(&b).unwrap();
    assert!(check_chip_id(&r, &e).unwrap().contains("masked"));
    // An 8-byte (Turin-style) hwID matches the first 8 bytes, rest zero.
    let mut t = e.clone();
    t.hw_id = Some(raw()[0x1A0..0x1A8].to_vec());
    let mut c = [0u8; 64];
    c[..8].copy_from_slice(&raw()[0x1A0..0x1A8]);
    assert!(t.hw_id_matches(&c));
    c[20] = 1;
    assert!(!t.hw_id_matches(&c));
    assert!(!t.hw_id_matches(&report().chip_id));
}

#[test]
fn tcb_mismatch() {
    let e = ek();
    for (off, component) in [
        (0x180, "bootloader"),
        (0x181, "tee"),
        (0x186, "snp"),
        (0x187, "microcode"),
    ] {
        let mut b = raw();
        b[off] ^= 1;
        let err = check_tcb(&parse_report(&b).unwrap(), &e).unwrap_err();
        match &err {
            SnpError::TcbMismatch { component: c, .. } => assert_eq!(*c, component),
            other => panic!("{other}"),
        }
    }
    // Decoded for Turin, the same bytes mean other components.
    let r = report().for_generation(Generation::Turin);
    assert!(r.is_ok());
    assert!(check_tcb(&r.unwrap(), &e).is_err());
}

fn table() -> Vec<u8> {
    let (ask, ark) = chain();
    build_cert_table(&[(guids::VCEK, VCEK), (guids::ASK, &ask), (guids::ARK, &ark)])
}

#[test]
fn cert_table_round_trip() {
    assert_eq!(
        uuid_string(&guids::VCEK),
        "63da758d-e664-4564-adc5-f4b93be8accd"
    );
    assert_eq!(
        uuid_string(&guids::VLEK),
        "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
    );
    assert_eq!(
        uuid_string(&guids::ASK),
        "4ab7b379-bbac-4fe4-a02f-05aef327c782"
    );
    assert_eq!(
        uuid_string(&guids::ARK),
        "c0b406a4-a803-4952-9743-3fb6014cd0ae"
    );
    let (ask, ark) = chain();
    let t = table();
    let p = parse_cert_table(&t).unwrap();
    assert_eq!(p.entries.len(), 3);
    assert_eq!(p.get(CertKind::Vcek), Some(VCEK));
    assert_eq!(p.get(CertKind::Ask), Some(&ask[..]));
    assert_eq!(p.get(CertKind::Ark), Some(&ark[..]));
    assert_eq!(p.get(CertKind::Vlek), None);
    assert_eq!(cert_table_extent(&t), Some(t.len()));
    // Padded to pages, as the driver returns it.
    let mut padded = t.clone();
    padded.resize(16384, 0);
    assert_eq!(parse_cert_table(&padded).unwrap(), p);
    assert_eq!(cert_table_extent(&padded), Some(t.len()));
    assert_eq!(cert_table_extent(&[0; 4096]), None);
    // Empty table; unknown GUIDs are kept.
    assert_eq!(parse_cert_table(&[0; 24]).unwrap().entries.len(), 0);
    let other = [7u8; 16];
    let t2 = build_cert_table(&[(other, b"x")]);
    assert_eq!(
        parse_cert_table(&t2).unwrap().entries[0].kind,
        CertKind::Other(other)
    );
}

#[test]
fn malformed_cert_tables() {
    let t = table();
    let set = |t: &mut Vec<u8>, entry: usize, field: usize, v: u32| {
        let o = entry * 24 + field;
        t[o..o + 4].copy_from_slice(&v.to_le_bytes());
    };
    let err = |t: &[u8]| match parse_cert_table(t) {
        Err(SnpError::CertTable(m)) => m,
        other => panic!("{other:?}"),
    };
    // Offset past the end, length past the end, both at u32::MAX.
    let mut b = t.clone();
    set(&mut b, 1, 16, t.len() as u32);
    assert!(err(&b).contains("past the end"));
    let mut b = t.clone();
    set(&mut b, 2, 20, 1 << 20);
    assert!(err(&b).contains("past the end"));
    let mut b = t.clone();
    set(&mut b, 0, 16, u32::MAX);
    set(&mut b, 0, 20, u32::MAX);
    assert!(err(&b).contains("past the end"));
    // Overlapping the entries, empty.
    let mut b = t.clone();
    set(&mut b, 0, 16, 8);
    assert!(err(&b).contains("overlaps"));
    let mut b = t.clone();
    set(&mut b, 0, 20, 0);
    assert!(err(&b).contains("empty"));
    // No terminator: truncated inside the entries, or all entries.
    assert!(err(&t[..60]).contains("no all-zero terminating entry"));
    assert!(err(&[]).contains("no all-zero"));
    assert!(err(&[1; 23]).contains("no all-zero"));
    let entries: Vec<u8> = (0..40u8)
        .flat_map(|i| {
            let mut e = [i + 1; 24];
            e[16..].fill(0);
            e
        })
        .collect();
    assert!(err(&entries).contains("more than 32 entries"));
    // A zero GUID with data; a GUID twice.
    let mut b = t.clone();
    b[24..40].fill(0);
    assert!(err(&b).contains("zero GUID"));
    let mut b = t.clone();
    let first: Vec<u8> = b[..16].to_vec();
    b[24..40].copy_from_slice(&first);
    assert!(err(&b).contains("twice"));
    assert!(err(&vec![0; MAX_CERT_TABLE + 1]).contains("exceed"));
}

/// Accepts the genuine Milan report: its measurement, and its TCB (3, 0,
/// 8, 115) as the minimum.
fn policy() -> SnpPolicy {
    SnpPolicy::from_toml(&format!(
        "allowed_measurements = [\"{MEASUREMENT}\"]\nmin_tcb = {{ bootloader = 3, tee = 0, snp = 8, microcode = 115 }}\n"
    ))
    .unwrap()
}

#[test]
fn policy_parsing() {
    let p = SnpPolicy::from_toml(&format!(
        r#"
        allowed_measurements = ["{}"]
        allow_debug = true
        max_vmpl = 2
        allow_migrate_ma = true
        require_single_socket = true
        allowed_family_ids = ["{}"]
        allowed_image_ids = []
        cert_dir = "/etc/ccnode/snp"
        [min_tcb]
        bootloader = 3
        tee = 0
        snp = 8
        microcode = 115
        "#,
        MEASUREMENT.to_uppercase(),
        "00".repeat(16)
    ))
    .unwrap();
    assert_eq!(hex::encode(p.allowed_measurements[0]), MEASUREMENT);
    assert!(p.allow_debug && p.allow_migrate_ma && p.require_single_socket);
    assert_eq!(p.max_vmpl, 2);
    assert_eq!(p.min_tcb.unwrap().microcode, 115);
    assert_eq!(p.allowed_family_ids, Some(vec![[0; 16]]));
    assert_eq!(p.allowed_image_ids, Some(vec![]));
    assert_eq!(p.cert_dir.as_deref(), Some(Path::new("/etc/ccnode/snp")));
    // Defaults.
    let d = SnpPolicy::from_toml("").unwrap();
    assert!(d.allowed_measurements.is_empty() && !d.allow_debug && d.max_vmpl == 0);
    assert!(d.allowed_family_ids.is_none() && d.min_tcb.is_none() && d.cert_dir.is_none());
    for bad in [
        "allowed_measurements = [\"zz\"]",
        "allowed_measurements = [\"00\"]",
        "unknown = 1",
        "max_vmpl = 4",
        "allowed_family_ids = [\"00\"]",
        "[min_tcb]\nbootloader = 1",
        "[min_tcb]\nbootloader = 1\ntee = 1\nsnp = 1\nmicrocode = 300",
        "[min_tcb]\nbootloader = 1\ntee = 1\nsnp = 1\nmicrocode = 3\nfoo = 1",
    ] {
        assert!(SnpPolicy::from_toml(bad).is_err(), "{bad}");
    }
    // The [snp] table of a verifier policy.
    let v = format!("allowed_aks = []\n[snp]\nallowed_measurements = [\"{MEASUREMENT}\"]\n[snp.min_tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n");
    assert_eq!(SnpPolicy::from_verifier_toml(&v).unwrap(), Some(policy()));
    assert_eq!(
        SnpPolicy::from_verifier_toml("allowed_aks = []").unwrap(),
        None
    );
    assert!(SnpPolicy::from_verifier_toml("[snp]\nmax_vmpl = 9").is_err());
}

#[test]
fn policy_checks() {
    let r = report();
    let p = policy();
    assert!(check_policy(&r, &p).unwrap().contains(MEASUREMENT));

    let e = check_policy(&r, &SnpPolicy::default()).unwrap_err();
    assert!(matches!(e, SnpError::NoAllowedMeasurements));
    assert!(e.to_string().contains("lists no allowed_measurements"));

    let mut other = p.clone();
    other.allowed_measurements = vec![[0; 48], [1; 48]];
    let e = check_policy(&r, &other).unwrap_err();
    assert!(
        matches!(e, SnpError::MeasurementNotAllowed { allowed: 2, .. }),
        "{e}"
    );
    assert!(e.to_string().contains(MEASUREMENT));

    let with_policy = |bits: u64| {
        let mut r = report();
        r.policy = GuestPolicy(r.policy.0 | bits);
        r
    };
    assert!(matches!(
        check_policy(&with_policy(1 << 19), &p),
        Err(SnpError::DebugNotAllowed)
    ));
    let mut allow = p.clone();
    allow.allow_debug = true;
    check_policy(&with_policy(1 << 19), &allow).unwrap();

    assert!(matches!(
        check_policy(&with_policy(1 << 18), &p),
        Err(SnpError::MigrateMaNotAllowed)
    ));
    allow.allow_migrate_ma = true;
    check_policy(&with_policy(1 << 18), &allow).unwrap();

    let mut single = p.clone();
    single.require_single_socket = true;
    assert!(matches!(
        check_policy(&r, &single),
        Err(SnpError::SingleSocketRequired)
    ));
    check_policy(&with_policy(1 << 20), &single).unwrap();

    let mut high = report();
    high.vmpl = 2;
    let e = check_policy(&high, &p).unwrap_err();
    assert!(
        matches!(e, SnpError::VmplTooHigh { vmpl: 2, max: 0 }),
        "{e}"
    );
    let mut vp = p.clone();
    vp.max_vmpl = 2;
    check_policy(&high, &vp).unwrap();

    let min = |bootloader, tee, snp, microcode, fmc| {
        let mut q = p.clone();
        q.min_tcb = Some(MinTcb {
            bootloader,
            tee,
            snp,
            microcode,
            fmc,
        });
        q
    };
    check_policy(&r, &min(3, 0, 8, 115, None)).unwrap();
    // No min_tcb: refused, unless any TCB is accepted explicitly.
    let mut none = p.clone();
    none.min_tcb = None;
    assert!(matches!(check_policy(&r, &none), Err(SnpError::NoMinTcb)));
    none.allow_any_tcb = true;
    let ok = check_policy(&r, &none).unwrap();
    assert!(ok.contains("not checked (allow_any_tcb)"), "{ok}");
    assert!(
        SnpPolicy::from_toml("allow_any_tcb = true")
            .unwrap()
            .allow_any_tcb
    );
    // fmc is compared only where the TCB has one (Turin).
    check_policy(&r, &min(3, 0, 8, 115, Some(9))).unwrap();
    for (q, component) in [
        (min(4, 0, 8, 115, None), "bootloader"),
        (min(3, 1, 8, 115, None), "tee"),
        (min(3, 0, 9, 115, None), "snp"),
        (min(3, 0, 8, 116, None), "microcode"),
    ] {
        match check_policy(&r, &q) {
            Err(SnpError::TcbTooLow { component: c, .. }) => assert_eq!(c, component),
            other => panic!("{other:?}"),
        }
    }
    let mut turin = report();
    turin.reported_tcb = TcbVersion::decode([2, 3, 0, 8, 0, 0, 0, 115], TcbLayout::Turin);
    let e = check_policy(&turin, &min(3, 0, 8, 115, Some(3))).unwrap_err();
    assert!(
        matches!(
            e,
            SnpError::TcbTooLow {
                component: "fmc",
                min: 3,
                ..
            }
        ),
        "{e}"
    );

    let mut fam = p.clone();
    fam.allowed_family_ids = Some(vec![[1; 16]]);
    assert!(matches!(
        check_policy(&r, &fam),
        Err(SnpError::FamilyIdNotAllowed(_))
    ));
    fam.allowed_family_ids = Some(vec![[0; 16]]);
    check_policy(&r, &fam).unwrap();
    let mut img = p.clone();
    img.allowed_image_ids = Some(vec![]);
    assert!(matches!(
        check_policy(&r, &img),
        Err(SnpError::ImageIdNotAllowed(_))
    ));
}

#[test]
fn binding_and_report_data() {
    let b = [0xabu8; 32];
    let d = report_data_for(&b);
    assert_eq!(&d[..32], &b);
    assert_eq!(&d[32..], &[0; 32]);
    // The logic verify_evidence applies, on a parsed report.
    let mut r = report();
    assert_ne!(r.report_data, d);
    r.report_data = d;
    assert_eq!(r.report_data, report_data_for(&b));
}

fn evidence(table: bool) -> serde_json::Value {
    let t = table.then(self::table);
    serde_json::to_value(SnpEvidence::new(&raw(), t.as_deref())).unwrap()
}

/// The fixture's REPORT_DATA is not a ccnode binding: with everything
/// else right, verify_evidence refuses it for exactly that.
#[test]
fn verify_evidence_on_the_fixture() {
    let binding = [7u8; 32];
    let e = verify_evidence(&evidence(true), &binding, &policy(), now()).unwrap_err();
    assert!(e.contains("report_data d447b55d"), "{e}");
    assert!(e.contains(&hex::encode(report_data_for(&binding))), "{e}");
    // Certificates from a cert_dir instead: the VCEK (DER) and the chain (PEM).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vcek.der"), VCEK).unwrap();
    std::fs::write(dir.path().join("cert_chain.pem"), CHAIN).unwrap();
    std::fs::write(dir.path().join("README"), "not a certificate").unwrap();
    let mut p = policy();
    p.cert_dir = Some(dir.path().to_path_buf());
    let e = verify_evidence_detailed(&evidence(false), &binding, &p, now()).unwrap_err();
    assert!(matches!(e, SnpError::ReportDataMismatch { .. }), "{e}");
    let certs = resolve_certs(&report(), None, Some(dir.path())).unwrap();
    assert!(certs.ask.is_some() && certs.ark.is_some());
    assert_eq!(certs.ek.der(), VCEK);
    // The VCEK alone in the directory: the built-in ASK.
    std::fs::remove_file(dir.path().join("cert_chain.pem")).unwrap();
    let certs = resolve_certs(&report(), None, Some(dir.path())).unwrap();
    assert!(certs.ask.is_none());
    let e = verify_evidence_detailed(&evidence(false), &binding, &p, now()).unwrap_err();
    assert!(matches!(e, SnpError::ReportDataMismatch { .. }), "{e}");
    // No VCEK for this chip.
    let mut b = raw();
    b[0x1A0] ^= 1;
    let e = resolve_certs(&parse_report(&b).unwrap(), None, Some(dir.path())).unwrap_err();
    assert!(e.to_string().contains("holds no VCEK for chip id"), "{e}");
    // No certificates anywhere.
    let e = verify_evidence(&evidence(false), &binding, &policy(), now()).unwrap_err();
    assert!(
        e.contains("no certificate table and the policy sets no cert_dir"),
        "{e}"
    );
    let mut missing = policy();
    missing.cert_dir = Some(dir.path().join("nope"));
    let e = verify_evidence(&evidence(false), &binding, &missing, now()).unwrap_err();
    assert!(e.contains("cannot read cert_dir"), "{e}");
    // Malformed evidence.
    for bad in [
        serde_json::json!({}),
        serde_json::json!({"report": "!!"}),
        serde_json::json!({"report": B64.encode(raw()), "extra": 1}),
        serde_json::json!({"report": B64.encode(raw()), "cert_table": "%"}),
        serde_json::json!({"report": B64.encode(&raw()[..100])}),
        serde_json::json!({"report": "A".repeat(10_000)}),
        serde_json::json!({"report": B64.encode(raw()), "cert_table": B64.encode([1u8; 30])}),
    ] {
        assert!(
            verify_evidence(&bad, &binding, &policy(), now()).is_err(),
            "{bad}"
        );
    }
    // A policy that refuses: the binding is checked first.
    let e = verify_evidence(&evidence(true), &binding, &SnpPolicy::default(), now()).unwrap_err();
    assert!(e.contains("report_data"), "{e}");
}

#[test]
fn split_chain_forms() {
    let (ask, ark) = split_chain(CHAIN.as_bytes()).unwrap();
    assert!(ask.is_some() && ark.is_some());
    // ARK first works too; the ASK alone; DER.
    let swapped = format!("{}{}", certs::ARK_MILAN, certs::ASK_MILAN);
    assert_eq!(
        split_chain(swapped.as_bytes()).unwrap(),
        (ask.clone(), ark.clone())
    );
    assert_eq!(
        split_chain(certs::ASK_MILAN.as_bytes()).unwrap(),
        (ask.clone(), None)
    );
    assert_eq!(split_chain(&ask.clone().unwrap()).unwrap(), (ask, None));
    assert!(split_chain(b"nothing").is_err());
    let two_arks = format!("{}{}", certs::ARK_MILAN, certs::ARK_GENOA);
    assert!(split_chain(two_arks.as_bytes()).is_err());
}

#[test]
fn missing_guest_device_names_the_path() {
    let p = Path::new("/nonexistent/sev-guest");
    let e = sev_guest_report(p, &[0; 64], 0).unwrap_err();
    assert!(matches!(e, SnpError::Device { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/sev-guest"), "{e}");
    let e = guest_evidence(p, &[0; 32], 0).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/sev-guest"), "{e}");
    assert!(sev_guest_report(p, &[0; 64], 4)
        .unwrap_err()
        .to_string()
        .contains("VMPL 4"));
    // A device that is not the SEV guest driver: the ioctls fail cleanly.
    let e = sev_guest_report(Path::new("/dev/null"), &[0; 64], 0).unwrap_err();
    assert!(matches!(e, SnpError::Firmware { .. }), "{e}");
}
