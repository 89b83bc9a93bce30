//! OMS verification without the reference tool: models signed by the test's
//! own minimal signer (same format), exercising the walk, the map-keyed
//! comparison, the trust policy, the sealed hand-over and format checks.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ccnode_attest::oms::{self, OmsError, PublicKey, TrustPolicy, VerifyOptions};
use common::{make_model, sign_locally};

fn verify(dir: &Path, sig: &[u8], policy: &TrustPolicy) -> Result<oms::VerifiedModel, OmsError> {
    let sig_path = dir.parent().unwrap().join("model.sig");
    fs::write(&sig_path, sig).unwrap();
    oms::verify_model(dir, &sig_path, policy, &VerifyOptions::new("m"))
}

fn key_policy(pem: &str) -> TrustPolicy {
    TrustPolicy::global_key(PublicKey::from_pem(pem).unwrap())
}

fn signed_model() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    let (sig, pem) = sign_locally(&dir, 7);
    (tmp, dir, sig, pem)
}

#[test]
fn verifies_and_hands_over_every_file() {
    let (_tmp, dir, sig, pem) = signed_model();
    let model = verify(&dir, &sig, &key_policy(&pem)).unwrap();
    let names: Vec<&str> = model.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "empty",
            "nested/data.dat",
            "nested/deeper/\u{fc}-d\u{e9}j\u{e0}.txt",
            "weights/model.safetensors"
        ]
    );
    assert_eq!(model.manifest_digest.len(), 64);
    for f in &model.files {
        let mut buf = vec![0u8; f.size as usize];
        assert_eq!(f.read_at(&mut buf, 0).unwrap(), buf.len());
        assert_eq!(buf, fs::read(dir.join(&f.name)).unwrap(), "{}", f.name);
    }
}

#[test]
fn overwrite_after_verification_does_not_reach_the_worker() {
    let (_tmp, dir, sig, pem) = signed_model();
    let model = verify(&dir, &sig, &key_policy(&pem)).unwrap();
    let target = dir.join("weights/model.safetensors");
    let verified = fs::read(&target).unwrap();
    // Overwrite in place (same inode) and replace by rename: neither reaches
    // the handed-over bytes.
    fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap()
        .write_all_at(&[0xAA; 16], 8)
        .unwrap();
    fs::write(dir.join("x"), b"evil").unwrap();
    fs::rename(dir.join("x"), dir.join("config.json")).unwrap();

    let file = model
        .files
        .iter()
        .find(|f| f.name == "weights/model.safetensors")
        .unwrap();
    let mut seen = vec![0u8; verified.len()];
    assert_eq!(file.read_at(&mut seen, 0).unwrap(), verified.len());
    assert_eq!(seen, verified);
    let config = model
        .files
        .iter()
        .find(|f| f.name == "config.json")
        .unwrap();
    let mut seen = vec![0u8; config.size as usize];
    config.read_at(&mut seen, 0).unwrap();
    assert_eq!(seen, b"{\"hidden\": 8}\n");

    // The fd is read-only and sealed: no write, grow, shrink or unseal.
    let fd = file.fd().as_raw_fd();
    let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
    let all = nix::fcntl::SealFlag::F_SEAL_WRITE
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_SEAL;
    assert_eq!(seals & all.bits(), all.bits());
    let writable = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{fd}"));
    if let Ok(w) = writable {
        assert!(
            w.write_at(b"x", 0).is_err(),
            "a sealed memfd accepted a write"
        );
        assert!(w.set_len(1).is_err(), "a sealed memfd accepted a truncate");
    }
    // The modified disk no longer verifies.
    assert!(matches!(
        verify(&dir, &sig, &key_policy(&pem)),
        Err(OmsError::Mismatch { .. })
    ));
}

#[test]
fn mismatch_names_extra_missing_and_changed_files() {
    let (_tmp, dir, sig, pem) = signed_model();
    fs::write(dir.join("extra.txt"), b"x").unwrap();
    fs::remove_file(dir.join("empty")).unwrap();
    common::flip_byte(&dir.join("nested/data.dat"), 100);
    match verify(&dir, &sig, &key_policy(&pem)) {
        Err(OmsError::Mismatch {
            extra,
            missing,
            mismatched,
        }) => {
            assert_eq!(extra, ["extra.txt"]);
            assert_eq!(missing, ["empty"]);
            assert_eq!(mismatched, ["nested/data.dat"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refuses_symlinks_and_special_files() {
    let (_tmp, dir, sig, pem) = signed_model();
    std::os::unix::fs::symlink("config.json", dir.join("link")).unwrap();
    assert!(
        matches!(verify(&dir, &sig, &key_policy(&pem)), Err(OmsError::Symlink(p)) if p == "link")
    );
    fs::remove_file(dir.join("link")).unwrap();
    nix::unistd::mkfifo(
        &dir.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    assert!(matches!(
        verify(&dir, &sig, &key_policy(&pem)),
        Err(OmsError::Entry { .. })
    ));
    fs::remove_file(dir.join("fifo")).unwrap();
    // The model directory itself as a symlink.
    let link = dir.parent().unwrap().join("mlink");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    assert!(matches!(
        verify(&link, &sig, &key_policy(&pem)),
        Err(OmsError::Symlink(_))
    ));
}

#[test]
fn refuses_pickle_files_by_name_and_by_magic() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("pytorch_model.bin"), b"anything").unwrap();
    let (sig, pem) = sign_locally(&dir, 7);
    assert!(
        matches!(verify(&dir, &sig, &key_policy(&pem)), Err(OmsError::Pickle { path, .. }) if path == "pytorch_model.bin")
    );
    fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    // By content, under a name no pickle format uses: protocol 4, protocol
    // 0 (no header: recognised by its opcodes), and a gzip stream (joblib
    // compresses its pickles).
    for (content, why) in [
        (&[0x80, 0x04, 0x95, 0, 0][..], "protocol 2-5"),
        (b"cos\nsystem\n(S'id'\ntR.", "protocol 0/1"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip"),
    ] {
        fs::write(dir.join("weights.data"), content).unwrap();
        let (sig, pem) = sign_locally(&dir, 7);
        match verify(&dir, &sig, &key_policy(&pem)) {
            Err(OmsError::Pickle { path, why: reason }) => {
                assert_eq!(path, "weights.data");
                assert!(reason.contains(why), "{reason} for {why}");
            }
            other => panic!("{why}: {other:?}"),
        }
    }
    // Text that merely begins with opcode bytes is kept.
    fs::write(dir.join("weights.data"), b"MIT License\n").unwrap();
    let (sig, pem) = sign_locally(&dir, 7);
    verify(&dir, &sig, &key_policy(&pem)).unwrap();
}

#[test]
fn refuses_bad_safetensors_even_when_signed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    fs::create_dir(&dir).unwrap();
    let mut bytes = common::safetensors_bytes();
    bytes.push(0); // one byte not covered by any tensor
    fs::write(dir.join("model.safetensors"), &bytes).unwrap();
    let (sig, pem) = sign_locally(&dir, 7);
    assert!(matches!(
        verify(&dir, &sig, &key_policy(&pem)),
        Err(OmsError::Safetensors { .. })
    ));
    fs::write(dir.join("model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
    let (sig, pem) = sign_locally(&dir, 7);
    assert!(matches!(
        verify(&dir, &sig, &key_policy(&pem)),
        Err(OmsError::Safetensors { .. })
    ));
}

#[test]
fn refuses_unsigned_and_untrusted_models() {
    let (tmp, dir, sig, pem) = signed_model();
    // No signature file.
    let missing = tmp.path().join("absent.sig");
    let err =
        oms::verify_model(&dir, &missing, &key_policy(&pem), &VerifyOptions::new("m")).unwrap_err();
    assert!(matches!(err, OmsError::Io { .. }));
    // An empty policy trusts nothing.
    assert!(matches!(
        verify(&dir, &sig, &TrustPolicy::default()),
        Err(OmsError::Untrusted { .. })
    ));
    // Another key: the hint does not match.
    let (_, other) = sign_locally(&dir, 9);
    assert!(matches!(
        verify(&dir, &sig, &key_policy(&other)),
        Err(OmsError::KeyHint { .. })
    ));
}

#[test]
fn trust_config_applies_per_model() {
    let (tmp, dir, sig, pem) = signed_model();
    fs::create_dir(tmp.path().join("keys")).unwrap();
    fs::write(tmp.path().join("keys/publisher.pem"), &pem).unwrap();
    let sig_path = tmp.path().join("model.sig");
    fs::write(&sig_path, &sig).unwrap();
    let config = tmp.path().join("trust.toml");
    fs::write(
        &config,
        "[[signer]]\nmodels = [\"other\"]\npublic_keys = [\"keys/publisher.pem\"]\n",
    )
    .unwrap();
    let policy = TrustPolicy::load(&config).unwrap();
    let err = oms::verify_model(&dir, &sig_path, &policy, &VerifyOptions::new("m")).unwrap_err();
    assert!(matches!(err, OmsError::Untrusted { .. }), "{err:?}");
    oms::verify_model(&dir, &sig_path, &policy, &VerifyOptions::new("other")).unwrap();
    fs::write(
        &config,
        "[[signer]]\nmodels = [\"*\"]\npublic_keys = [\"keys/publisher.pem\"]\n",
    )
    .unwrap();
    oms::verify_model(
        &dir,
        &sig_path,
        &TrustPolicy::load(&config).unwrap(),
        &VerifyOptions::new("m"),
    )
    .unwrap();
    // Bad configurations name the key.
    fs::write(
        &config,
        "[[signer]]\nmodels = []\npublic_keys = [\"keys/publisher.pem\"]\n",
    )
    .unwrap();
    assert!(
        matches!(TrustPolicy::load(&config), Err(OmsError::TrustMaterial { what, .. }) if what == "signer[0].models")
    );
    fs::write(&config, "[[signer]]\nmodels = [\"*\"]\nbogus = 1\n").unwrap();
    assert!(TrustPolicy::load(&config).is_err());
}

#[test]
fn subject_is_model_binds_the_signed_name_to_the_model_verified() {
    // The local signer names its statement "local"; the directory is "m".
    let (tmp, dir, sig, pem) = signed_model();
    let sig_path = tmp.path().join("model.sig");
    fs::write(&sig_path, &sig).unwrap();
    let as_model = |policy: &TrustPolicy, id: &str| {
        oms::verify_model(&dir, &sig_path, policy, &VerifyOptions::new(id)).map(|_| ())
    };
    let mut bound = key_policy(&pem);
    bound.entries[0].subject_is_model = true;
    as_model(&bound, "local").unwrap();
    let err = as_model(&bound, "m").unwrap_err();
    assert!(
        matches!(&err, OmsError::SubjectName { model, name } if model == "m" && name == "local"),
        "{err:?}"
    );
    assert_eq!(err.kind(), "subject_name");
    // Without it, the same signature verifies as any model the key covers.
    as_model(&key_policy(&pem), "m").unwrap();
    // Entries are alternatives: another entry trusting the same key
    // without the requirement still lets it through.
    let mut either = bound.clone();
    either.entries.push(key_policy(&pem).entries.remove(0));
    as_model(&either, "m").unwrap();

    // Certificate-signed: the same.
    let t = tmp.path();
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n";
    let root = common::issue_cert(t, "root", None, ca);
    let leaf = common::issue_cert(
        t,
        "leaf",
        Some("root"),
        "keyUsage=critical,digitalSignature\n",
    );
    let chain_sig =
        common::sign_with_chain(&dir, &t.join("leaf.key"), &[common::pem_to_der(&leaf)]);
    fs::write(&sig_path, &chain_sig).unwrap();
    let mut roots = TrustPolicy::global_roots(oms::policy::load_certificates(&root).unwrap());
    as_model(&roots, "m").unwrap();
    roots.entries[0].subject_is_model = true;
    as_model(&roots, "local").unwrap();
    assert!(matches!(
        as_model(&roots, "m"),
        Err(OmsError::SubjectName { .. })
    ));

    // The trust configuration's key.
    fs::create_dir(t.join("keys")).unwrap();
    fs::write(t.join("keys/publisher.pem"), &pem).unwrap();
    fs::write(&sig_path, &sig).unwrap();
    let config = t.join("trust.toml");
    fs::write(
        &config,
        "[[signer]]\nmodels = [\"*\"]\npublic_keys = [\"keys/publisher.pem\"]\nsubject_is_model = true\n",
    )
    .unwrap();
    let loaded = TrustPolicy::load(&config).unwrap();
    assert!(loaded.entries[0].subject_is_model);
    assert!(matches!(
        as_model(&loaded, "m"),
        Err(OmsError::SubjectName { .. })
    ));
}

#[test]
fn signature_inside_the_model_directory_is_not_an_extra_file() {
    let (_tmp, dir, sig, pem) = signed_model();
    let inside = dir.join("model.sig");
    fs::write(&inside, &sig).unwrap();
    oms::verify_model(&dir, &inside, &key_policy(&pem), &VerifyOptions::new("m")).unwrap();
}

#[test]
fn verdict_only_hands_nothing_over_and_checks_the_same() {
    let (tmp, dir, sig, pem) = signed_model();
    let sig_path = tmp.path().join("model.sig");
    fs::write(&sig_path, &sig).unwrap();
    let policy = key_policy(&pem);
    let opts = VerifyOptions::new("m");
    let model = oms::verify_model_with(&dir, &sig_path, &policy, &opts, oms::HandOver::VerdictOnly)
        .unwrap();
    assert!(model.files.is_empty());
    assert_eq!(model.file_count, 5);
    let sealed = oms::verify_model(&dir, &sig_path, &policy, &opts).unwrap();
    assert_eq!(sealed.manifest_digest, model.manifest_digest);
    assert_eq!(sealed.bytes_hashed, model.bytes_hashed);
    common::flip_byte(&dir.join("weights/model.safetensors"), 30);
    let err = oms::verify_model_with(&dir, &sig_path, &policy, &opts, oms::HandOver::VerdictOnly)
        .unwrap_err();
    assert!(matches!(err, OmsError::Mismatch { .. }));
}

#[test]
fn symlinks_allowed_by_the_signature_resolve_beneath_the_model() {
    let (_tmp, dir, _, _) = signed_model();
    std::os::unix::fs::symlink("../config.json", dir.join("nested/link.json")).unwrap();
    let (sig, pem) = common::sign_locally_with(&dir, 7, true);
    let model = verify(&dir, &sig, &key_policy(&pem)).unwrap();
    let link = model
        .files
        .iter()
        .find(|f| f.name == "nested/link.json")
        .unwrap();
    let mut buf = vec![0u8; link.size as usize];
    link.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, fs::read(dir.join("config.json")).unwrap());

    // A link out of the model, a chained link, a dangling one: refused
    // even though the signature allows symlinks.
    let outside = dir.parent().unwrap().join("outside.txt");
    fs::write(&outside, b"outside").unwrap();
    for (name, target) in [
        ("out.txt", outside.to_str().unwrap()),
        ("up.txt", "../outside.txt"),
        ("chain.json", "nested/link.json"),
        ("dangling", "nope"),
    ] {
        std::os::unix::fs::symlink(target, dir.join(name)).unwrap();
        let err = verify(&dir, &sig, &key_policy(&pem)).unwrap_err();
        assert!(matches!(err, OmsError::Symlink(_)), "{name}: {err:?}");
        fs::remove_file(dir.join(name)).unwrap();
    }
}

#[test]
fn a_tiny_signed_shard_size_is_bounded() {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("big.dat"), vec![b'D'; 2_000_001]).unwrap();
    // A statement with shard_size 1 (signed by the test key): two million
    // shards would be needed, more than any manifest may list.
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;
    let key = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
    let pem = key
        .verifying_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "m", "digest": {"sha256": hex::encode(Sha256::digest(b""))}}],
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": {
            "serialization": {"method": "shards", "hash_type": "sha256", "allow_symlinks": false, "shard_size": 1},
            "resources": [],
        },
    });
    let payload = serde_json::to_vec(&statement).unwrap();
    let pae = oms::bundle::pae("application/vnd.in-toto+json", &payload);
    let sig: p256::ecdsa::Signature = key.sign(&pae);
    let b64 = base64::engine::general_purpose::STANDARD;
    let bundle = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {}},
        "dsseEnvelope": {
            "payload": b64.encode(&payload),
            "payloadType": "application/vnd.in-toto+json",
            "signatures": [{"sig": b64.encode(sig.to_der().as_bytes())}],
        },
    });
    let err = verify(
        &dir,
        &serde_json::to_vec(&bundle).unwrap(),
        &key_policy(&pem),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            OmsError::TooLarge {
                what: "shard count",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn certificate_chains_without_the_reference_tool() {
    let (tmp, dir, _, _) = signed_model();
    let t = tmp.path();
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n";
    let leaf_ext = "keyUsage=critical,digitalSignature\nsubjectAltName=email:release@example.com\n";
    let root = common::issue_cert(t, "root", None, ca);
    let int = common::issue_cert(t, "int", Some("root"), ca);
    let leaf = common::issue_cert(t, "leaf", Some("int"), leaf_ext);
    let roots = TrustPolicy::global_roots(oms::policy::load_certificates(&root).unwrap());
    let chain = [common::pem_to_der(&leaf), common::pem_to_der(&int)];
    let sig = common::sign_with_chain(&dir, &t.join("leaf.key"), &chain);
    let model = verify(&dir, &sig, &roots).unwrap();
    assert_eq!(model.signer, "certificate CN=leaf");

    // The chain without its intermediate does not reach the root.
    let sig_short = common::sign_with_chain(&dir, &t.join("leaf.key"), &chain[..1]);
    assert!(matches!(
        verify(&dir, &sig_short, &roots),
        Err(OmsError::Certificate(_))
    ));

    // An intermediate that is not a CA.
    let notca = common::issue_cert(
        t,
        "notca",
        Some("root"),
        "basicConstraints=critical,CA:FALSE\n",
    );
    let leaf2 = common::issue_cert(t, "leaf2", Some("notca"), leaf_ext);
    let chain2 = [common::pem_to_der(&leaf2), common::pem_to_der(&notca)];
    let sig2 = common::sign_with_chain(&dir, &t.join("leaf2.key"), &chain2);
    let err = verify(&dir, &sig2, &roots).unwrap_err();
    assert!(
        matches!(&err, OmsError::Certificate(m) if m.contains("not a CA")),
        "{err:?}"
    );

    // A leaf whose key usage excludes signing.
    let enc = common::issue_cert(t, "enc", Some("int"), "keyUsage=critical,keyEncipherment\n");
    let sig3 = common::sign_with_chain(
        &dir,
        &t.join("enc.key"),
        &[common::pem_to_der(&enc), common::pem_to_der(&int)],
    );
    assert!(matches!(
        verify(&dir, &sig3, &roots),
        Err(OmsError::Certificate(_))
    ));

    // A valid chain, but the DSSE signature by another key.
    let sig4 = common::sign_with_chain(&dir, &t.join("enc.key"), &chain);
    assert!(matches!(
        verify(&dir, &sig4, &roots),
        Err(OmsError::BadSignature)
    ));

    // A certificate-signed model under a key-only policy.
    let (_, pem) = sign_locally(&dir, 7);
    assert!(matches!(
        verify(&dir, &sig, &key_policy(&pem)),
        Err(OmsError::Untrusted { .. })
    ));
}

#[test]
fn ccnode_verify_with_a_trust_config_and_a_certificate_chain() {
    let (tmp, dir, sig, pem) = signed_model();
    let t = tmp.path();
    let bin = env!("CARGO_BIN_EXE_ccnode-verify");
    fs::write(t.join("model.sig"), &sig).unwrap();
    fs::write(t.join("pub.pem"), &pem).unwrap();
    fs::write(
        t.join("trust.toml"),
        "[[signer]]\nmodels = [\"m\"]\npublic_keys = [\"pub.pem\"]\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .arg("model")
            .arg(&dir)
            .arg("--signature")
            .arg(t.join("model.sig"))
            .args(args)
            .output()
            .unwrap()
    };
    let trust = t.join("trust.toml");
    let ok = run(&["--trust-config", trust.to_str().unwrap(), "--sealed-copy"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("verified: model local (5 files"));
    // Another model id: no entry covers it.
    let other = run(&[
        "--trust-config",
        trust.to_str().unwrap(),
        "--model-id",
        "x",
        "--json",
    ]);
    assert_eq!(other.status.code(), Some(3));
    let json: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_eq!(json["error"], "untrusted");

    // Certificate signing, the roots given as two files.
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n";
    let root = common::issue_cert(t, "root", None, ca);
    let other_root = common::issue_cert(t, "other", None, ca);
    let leaf = common::issue_cert(t, "leaf", Some("root"), "extendedKeyUsage=codeSigning\n");
    let chain = [common::pem_to_der(&leaf)];
    fs::write(
        t.join("model.sig"),
        common::sign_with_chain(&dir, &t.join("leaf.key"), &chain),
    )
    .unwrap();
    let ok = run(&[
        "--certificate-chain",
        other_root.to_str().unwrap(),
        root.to_str().unwrap(),
    ]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = run(&["--certificate-chain", other_root.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(3));
    // Two trust options at once is a usage error.
    let usage = run(&[
        "--certificate-chain",
        root.to_str().unwrap(),
        "--public-key",
        "x",
    ]);
    assert_eq!(usage.status.code(), Some(2));
}

/// Issuer constraints: path length, keyCertSign, critical extensions ccnode
/// does not process (name constraints among them), and signing
/// certificates whose usage extensions exclude signing code.
#[test]
fn certificate_chain_constraints_are_enforced() {
    let (tmp, dir, _, _) = signed_model();
    let t = tmp.path();
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n";
    let leaf_ext = "keyUsage=critical,digitalSignature\nsubjectAltName=email:release@example.com\n";
    let root = common::issue_cert(t, "root", None, ca);
    let roots = TrustPolicy::global_roots(oms::policy::load_certificates(&root).unwrap());
    // Signs with `leaf`, sending it and `intermediates` (nearest first).
    let signed = |leaf: &str, intermediates: &[&str]| {
        let mut chain = vec![common::pem_to_der(&t.join(format!("{leaf}.pem")))];
        for i in intermediates {
            chain.push(common::pem_to_der(&t.join(format!("{i}.pem"))));
        }
        let sig = common::sign_with_chain(&dir, &t.join(format!("{leaf}.key")), &chain);
        verify(&dir, &sig, &roots)
    };
    let refused = |r: Result<oms::VerifiedModel, OmsError>, why: &str| match r {
        Err(OmsError::Certificate(m)) => assert!(m.contains(why), "{m}"),
        other => panic!("expected a certificate refusal ({why}): {other:?}"),
    };

    // pathlen:0 allows no intermediate below; pathlen:1 allows one.
    let p0 = "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign\n";
    common::issue_cert(t, "p0", Some("root"), p0);
    common::issue_cert(t, "p0sub", Some("p0"), ca);
    common::issue_cert(t, "p0leaf", Some("p0sub"), leaf_ext);
    refused(signed("p0leaf", &["p0sub", "p0"]), "allows 0 intermediate");
    common::issue_cert(t, "p0direct", Some("p0"), leaf_ext);
    signed("p0direct", &["p0"]).unwrap();
    let p1 = "basicConstraints=critical,CA:TRUE,pathlen:1\nkeyUsage=critical,keyCertSign\n";
    common::issue_cert(t, "p1", Some("root"), p1);
    common::issue_cert(t, "p1sub", Some("p1"), ca);
    common::issue_cert(t, "p1leaf", Some("p1sub"), leaf_ext);
    signed("p1leaf", &["p1sub", "p1"]).unwrap();

    // A CA whose key usage leaves out keyCertSign.
    let nokcs = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,digitalSignature\n";
    common::issue_cert(t, "nokcs", Some("root"), nokcs);
    common::issue_cert(t, "nokcsleaf", Some("nokcs"), leaf_ext);
    refused(signed("nokcsleaf", &["nokcs"]), "keyCertSign");

    // Critical extensions ccnode does not process, on the signing
    // certificate and on an issuer (name constraints: refused, not ignored).
    common::issue_cert(t, "int", Some("root"), ca);
    common::issue_cert(
        t,
        "oddleaf",
        Some("int"),
        &format!("{leaf_ext}1.2.3.4=critical,ASN1:NULL\n"),
    );
    refused(signed("oddleaf", &["int"]), "critical extension");
    let nc = format!("{ca}nameConstraints=critical,permitted;email:.example.com\n");
    common::issue_cert(t, "ncint", Some("root"), &nc);
    common::issue_cert(t, "ncleaf", Some("ncint"), leaf_ext);
    refused(signed("ncleaf", &["ncint"]), "2.5.29.30");
    // Name constraints not marked critical are refused too: ignoring them
    // would accept names the issuer may not vouch for.
    let nc_soft = format!("{ca}nameConstraints=permitted;email:.example.com\n");
    common::issue_cert(t, "ncsoft", Some("root"), &nc_soft);
    common::issue_cert(t, "ncsoftleaf", Some("ncsoft"), leaf_ext);
    refused(
        signed("ncsoftleaf", &["ncsoft"]),
        "constraint ccnode does not process",
    );
    // The same extension not critical is only information.
    common::issue_cert(
        t,
        "fineleaf",
        Some("int"),
        &format!("{leaf_ext}1.2.3.4=ASN1:NULL\n"),
    );
    signed("fineleaf", &["int"]).unwrap();

    // Usage: a TLS server's certificate, and a codeSigning one whose key
    // usage excludes signatures, are refused; codeSigning alone is enough.
    let tls = "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n";
    common::issue_cert(t, "tls", Some("int"), tls);
    refused(signed("tls", &["int"]), "does not allow codeSigning");
    let enc = "keyUsage=critical,keyEncipherment\nextendedKeyUsage=codeSigning\n";
    common::issue_cert(t, "encsign", Some("int"), enc);
    refused(
        signed("encsign", &["int"]),
        "does not allow digitalSignature",
    );
    common::issue_cert(t, "codesign", Some("int"), "extendedKeyUsage=codeSigning\n");
    signed("codesign", &["int"]).unwrap();
    common::issue_cert(
        t,
        "anyusage",
        Some("int"),
        "extendedKeyUsage=anyExtendedKeyUsage\n",
    );
    signed("anyusage", &["int"]).unwrap();

    // A self-signed signing certificate configured as its own root is
    // trusted directly: no keyCertSign is asked of it.
    let own = common::issue_cert(t, "own", None, "keyUsage=critical,digitalSignature\n");
    let own_root = TrustPolicy::global_roots(oms::policy::load_certificates(&own).unwrap());
    let sig = common::sign_with_chain(&dir, &t.join("own.key"), &[common::pem_to_der(&own)]);
    verify(&dir, &sig, &own_root).unwrap();
}

/// A policy's identities match the certificate's alternative names; the
/// subject's CN only where there are none.
#[test]
fn a_cn_is_an_identity_only_without_alternative_names() {
    let (tmp, dir, _, _) = signed_model();
    let t = tmp.path();
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n";
    common::issue_cert(t, "root", None, ca);
    let config = t.join("trust.toml");
    fs::write(
        &config,
        "[[signer]]\nmodels = [\"m\"]\nca_roots = [\"root.pem\"]\nidentities = [\"release@example.com\"]\n",
    )
    .unwrap();
    let policy = TrustPolicy::load(&config).unwrap();
    let signed = |leaf: &str| {
        let chain = [common::pem_to_der(&t.join(format!("{leaf}.pem")))];
        let sig = common::sign_with_chain(&dir, &t.join(format!("{leaf}.key")), &chain);
        verify(&dir, &sig, &policy)
    };
    // CN=release@example.com, no alternative names: the CN is the identity.
    common::issue_cert(
        t,
        "release@example.com",
        Some("root"),
        "keyUsage=critical,digitalSignature\n",
    );
    signed("release@example.com").unwrap();
    // The same CN beside another address: only the address counts.
    let other = "keyUsage=critical,digitalSignature\nsubjectAltName=email:someone@example.org\n";
    common::issue_cert(t, "release@example.com", Some("root"), other);
    fs::rename(t.join("release@example.com.pem"), t.join("copied.pem")).unwrap();
    fs::rename(t.join("release@example.com.key"), t.join("copied.key")).unwrap();
    assert!(matches!(signed("copied"), Err(OmsError::Untrusted { .. })));
}

/// A typed policy identity (`email:`, `uri:`, `dns:`, `cn:`) matches
/// only an identity of that kind; a bare one matches any kind.
#[test]
fn typed_identities_match_their_kind_only() {
    let (tmp, dir, _, _) = signed_model();
    let t = tmp.path();
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign\n";
    common::issue_cert(t, "root", None, ca);
    // A URI alternative name spelled like an address, and a DNS name.
    common::issue_cert(
        t,
        "leaf",
        Some("root"),
        "keyUsage=critical,digitalSignature\nsubjectAltName=URI:release@example.com,DNS:models.example.com\n",
    );
    let chain = [common::pem_to_der(&t.join("leaf.pem"))];
    let sig = common::sign_with_chain(&dir, &t.join("leaf.key"), &chain);
    let config = t.join("trust.toml");
    let with = |identity: &str| {
        fs::write(
            &config,
            format!("[[signer]]\nmodels = [\"m\"]\nca_roots = [\"root.pem\"]\nidentities = [\"{identity}\"]\n"),
        )
        .unwrap();
        verify(&dir, &sig, &TrustPolicy::load(&config).unwrap())
    };
    with("release@example.com").unwrap();
    with("uri:release@example.com").unwrap();
    with("dns:models.example.com").unwrap();
    for refused in [
        "email:release@example.com",
        "dns:release@example.com",
        "uri:models.example.com",
        "cn:leaf",
    ] {
        assert!(
            matches!(with(refused), Err(OmsError::Untrusted { .. })),
            "{refused}"
        );
    }
}

/// A model with more files than the caller's soft open-file limit: the
/// verifier holds every file (and, with `--sealed-copy`, a memfd for each)
/// open at once, so it raises its soft limit to the hard one first.
#[test]
fn ccnode_verify_raises_a_low_soft_open_file_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    for i in 0..150 {
        fs::write(dir.join(format!("part-{i:03}.txt")), format!("{i}")).unwrap();
    }
    let (sig, pem) = sign_locally(&dir, 7);
    fs::write(tmp.path().join("model.sig"), &sig).unwrap();
    fs::write(tmp.path().join("pub.pem"), &pem).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -Sn 64 && exec "$@""#)
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_ccnode-verify"))
        .arg("model")
        .arg(&dir)
        .arg("--signature")
        .arg(tmp.path().join("model.sig"))
        .arg("--public-key")
        .arg(tmp.path().join("pub.pem"))
        .arg("--sealed-copy")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(155 files"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
