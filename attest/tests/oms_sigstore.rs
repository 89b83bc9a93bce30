//! Sigstore keyless model signatures, verified offline.
//!
//! Two sources of signatures:
//! - a genuine one: a model signed by model_signing against the public-good
//!   Sigstore instance (Fulcio, Rekor, CT log), verified with the production
//!   trust root embedded in sigstore-python (tests/fixtures/sigstore/README.md
//!   gives the provenance of both); every byte of every signed field, flipped,
//!   is refused;
//! - a private instance (tests/interop/sigstore_instance.py) that plays Fulcio,
//!   the CT log and Rekor, so each single defect can be made on purpose; on
//!   every one, the reference verifier (model_signing verify sigstore) and
//!   ccnode give the same verdict.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ccnode_attest::oms::bundle::Bundle;
use ccnode_attest::oms::sigstore::{Identity, TrustedRoot};
use ccnode_attest::oms::{self, HandOver, OmsError, TrustPolicy, VerifyOptions};
use common::{copy_dir, flip_byte, make_model, run, venv};
use serde_json::Value;

const ID: &str = "stefanb@us.ibm.com";
const ISSUER: &str = "https://sigstore.verify.ibm.com/oauth2";
const MODEL: &str = "v1.1.0-sigstore";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sigstore")
}

fn production_root_json() -> Value {
    serde_json::from_slice(&fs::read(fixtures().join("production-trusted_root.json")).unwrap())
        .unwrap()
}

fn root_from(v: &Value) -> Result<TrustedRoot, String> {
    TrustedRoot::parse(&serde_json::to_vec(v).unwrap())
}

fn policy(root: TrustedRoot, identity: &str, issuer: &str) -> TrustPolicy {
    TrustPolicy::global_sigstore(
        root,
        vec![Identity {
            identity: identity.into(),
            issuer: issuer.into(),
        }],
    )
}

fn production_policy() -> TrustPolicy {
    policy(root_from(&production_root_json()).unwrap(), ID, ISSUER)
}

fn genuine() -> Value {
    serde_json::from_slice(&fs::read(fixtures().join("v1.1.0-sigstore.sig")).unwrap()).unwrap()
}

/// The signature layer alone (bundle, log entry, certificate, identity).
fn check(bundle: &Value, policy: &TrustPolicy) -> Result<String, OmsError> {
    let parsed = Bundle::parse(&serde_json::to_vec(bundle).unwrap())?;
    policy.verify_bundle(&parsed, &VerifyOptions::new(MODEL))
}

const ENTRY: &str = "/verificationMaterial/tlogEntries/0";

/// Replaces the base64 field at `pointer` with `f` applied to its bytes.
fn edit_b64(bundle: &Value, pointer: &str, f: impl FnOnce(&mut Vec<u8>)) -> Value {
    let mut v = bundle.clone();
    let field = v
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer}"));
    let mut bytes = STANDARD.decode(field.as_str().unwrap()).unwrap();
    f(&mut bytes);
    *field = Value::String(STANDARD.encode(bytes));
    v
}

/// A copy of `bundle` with `f` applied to the value at `pointer`.
fn edited(bundle: &Value, pointer: &str, f: impl FnOnce(&mut Value)) -> Value {
    let mut v = bundle.clone();
    f(v.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer}")));
    v
}

fn b64_len(bundle: &Value, pointer: &str) -> usize {
    STANDARD
        .decode(bundle.pointer(pointer).unwrap().as_str().unwrap())
        .unwrap()
        .len()
}

/// The pointers of the first entry's inclusion proof hashes.
fn proof_hash_fields(bundle: &Value) -> Vec<String> {
    let hashes = bundle
        .pointer(&format!("{ENTRY}/inclusionProof/hashes"))
        .unwrap();
    (0..hashes.as_array().unwrap().len())
        .map(|i| format!("{ENTRY}/inclusionProof/hashes/{i}"))
        .collect()
}

/// Flips each byte of each base64 field in turn and asserts `refused` of
/// every copy; how many copies were made.
fn flip_each_byte(bundle: &Value, fields: &[String], refused: impl Fn(&Value) -> bool) -> usize {
    let mut flipped = 0;
    for field in fields {
        for at in 0..b64_len(bundle, field) {
            let tampered = edit_b64(bundle, field, |bytes| bytes[at] ^= 0x01);
            assert!(refused(&tampered), "{field} byte {at} flipped: accepted");
            flipped += 1;
        }
    }
    flipped
}

const CHECKPOINT: &str = "/verificationMaterial/tlogEntries/0/inclusionProof/checkpoint/envelope";

/// Flips each of the first `upto` bytes of the first entry's checkpoint
/// (those flips that keep it UTF-8) and asserts `refused` of every copy;
/// how many copies were made.
fn flip_each_checkpoint_byte(
    bundle: &Value,
    upto: usize,
    refused: impl Fn(&Value) -> bool,
) -> usize {
    let note = bundle.pointer(CHECKPOINT).unwrap().as_str().unwrap();
    let mut flipped = 0;
    for at in 0..upto {
        let mut bytes = note.as_bytes().to_vec();
        bytes[at] ^= 0x01;
        let Ok(changed) = String::from_utf8(bytes) else {
            continue;
        };
        let mut tampered = bundle.clone();
        *tampered.pointer_mut(CHECKPOINT).unwrap() = Value::String(changed);
        assert!(refused(&tampered), "checkpoint byte {at}: accepted");
        flipped += 1;
    }
    flipped
}

#[test]
fn subject_is_model_holds_for_keyless_signatures() {
    let mut policy = production_policy();
    policy.entries[0].subject_is_model = true;
    check(&genuine(), &policy).expect("the statement names the model");
    let parsed = Bundle::parse(&serde_json::to_vec(&genuine()).unwrap()).unwrap();
    let err = policy
        .verify_bundle(&parsed, &VerifyOptions::new("another-model"))
        .unwrap_err();
    assert!(
        matches!(&err, OmsError::SubjectName { model, name } if model == "another-model" && name == MODEL),
        "{err:?}"
    );
    // Without the requirement the signature is the signer's for any model.
    production_policy()
        .verify_bundle(&parsed, &VerifyOptions::new("another-model"))
        .unwrap();
}

#[test]
fn genuine_keyless_model_verifies_offline() {
    let model = oms::verify_model_with(
        &fixtures().join(MODEL),
        &fixtures().join("v1.1.0-sigstore.sig"),
        &production_policy(),
        &VerifyOptions::new(MODEL),
        HandOver::SealedCopy,
    )
    .expect("the genuine keyless signature verifies");
    assert_eq!(model.model_name, MODEL);
    assert_eq!(model.file_count, 2);
    assert!(model.signer.contains(ID), "{}", model.signer);
    assert!(model.signer.contains(ISSUER), "{}", model.signer);
    assert!(
        model.signer.contains("rekor.sigstore.dev"),
        "{}",
        model.signer
    );
    assert!(model.signer.contains("598151086"), "{}", model.signer);
    // Its RFC 3161 timestamp (sigstore-tsa) verified too.
    assert!(
        model.signer.contains("timestamped 2025-10-10T02:12:20Z"),
        "{}",
        model.signer
    );
}

const TIMESTAMP: &str =
    "/verificationMaterial/timestampVerificationData/rfc3161Timestamps/0/signedTimestamp";

fn genuine_timestamp() -> (Vec<u8>, Vec<u8>) {
    let b = genuine();
    let der = STANDARD
        .decode(b.pointer(TIMESTAMP).unwrap().as_str().unwrap())
        .unwrap();
    let sig = STANDARD
        .decode(
            b.pointer("/dsseEnvelope/signatures/0/sig")
                .unwrap()
                .as_str()
                .unwrap(),
        )
        .unwrap();
    (der, sig)
}

#[test]
fn the_genuine_rfc3161_timestamp_verifies_and_every_byte_of_it_matters() {
    let root = root_from(&production_root_json()).unwrap();
    let (der, sig) = genuine_timestamp();
    let at = root.verify_timestamp(&der, &sig).unwrap();
    assert_eq!(
        at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        1_760_062_340
    );
    // Over another signature: refused.
    let mut other = sig.clone();
    other[10] ^= 1;
    assert!(root.verify_timestamp(&der, &other).is_err());
    // Every byte flipped, one at a time: refused.
    for at in 0..der.len() {
        let mut t = der.clone();
        t[at] ^= 0x01;
        assert!(
            root.verify_timestamp(&t, &sig).is_err(),
            "timestamp byte {at} of {} flipped: accepted",
            der.len()
        );
    }
    // Truncated anywhere, or with trailing bytes: refused.
    for len in 0..der.len() {
        assert!(root.verify_timestamp(&der[..len], &sig).is_err(), "{len}");
    }
    let mut long = der.clone();
    long.push(0);
    assert!(root.verify_timestamp(&long, &sig).is_err());
}

#[test]
fn timestamps_need_an_authority_and_a_valid_certificate_at_their_time() {
    let b = genuine();
    let p = production_policy();
    // A broken timestamp is no time source and is set aside, as the
    // reference does: the log's time still proves the signature.
    let broken = edit_b64(&b, TIMESTAMP, |t| {
        let n = t.len();
        t[n - 5] ^= 1
    });
    let signer = check(&broken, &p).unwrap();
    assert!(!signer.contains("timestamped"), "{signer}");
    // Timestamps and a trust root without timestamp authorities: refused.
    let mut root = production_root_json();
    root["timestampAuthorities"] = Value::Array(vec![]);
    let no_tsa = policy(root_from(&root).unwrap(), ID, ISSUER);
    assert!(matches!(check(&b, &no_tsa), Err(OmsError::Timestamp(_))));
    // The same bundle without its timestamps verifies under that root.
    let bare = edited(&b, "/verificationMaterial", |m| {
        m.as_object_mut()
            .unwrap()
            .remove("timestampVerificationData");
    });
    check(&bare, &no_tsa).unwrap();
    // An authority whose window in the trust root ends before the
    // timestamp: the timestamp does not verify, and is set aside.
    let mut root = production_root_json();
    root["timestampAuthorities"][0]["validFor"]["end"] = Value::from("2025-10-10T02:12:20Z");
    let root = root_from(&root).unwrap();
    let (der, sig) = genuine_timestamp();
    assert!(matches!(
        root.verify_timestamp(&der, &sig),
        Err(OmsError::Timestamp(m)) if m.contains("outside")
    ));
    // Duplicates, and more than 32, are refused when the bundle is read.
    let dup = edited(
        &b,
        "/verificationMaterial/timestampVerificationData/rfc3161Timestamps",
        |t| {
            let first = t[0].clone();
            t.as_array_mut().unwrap().push(first);
        },
    );
    assert!(matches!(check(&dup, &p), Err(OmsError::Bundle(_))));
}

#[test]
fn genuine_keyless_model_refused_when_a_file_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(MODEL);
    copy_dir(&fixtures().join(MODEL), &dir);
    flip_byte(&dir.join("signme-2"), 0);
    let err = oms::verify_model(
        &dir,
        &fixtures().join("v1.1.0-sigstore.sig"),
        &production_policy(),
        &VerifyOptions::new(MODEL),
    )
    .unwrap_err();
    assert!(
        matches!(&err, OmsError::Mismatch { mismatched, .. } if mismatched == &["signme-2"]),
        "{err}"
    );
}

#[test]
fn identity_policy_is_matched_as_pairs() {
    let b = genuine();
    check(&b, &production_policy()).unwrap();
    let root = || root_from(&production_root_json()).unwrap();
    for (identity, issuer) in [
        ("stefan@us.ibm.com", ISSUER),
        (ID, "https://accounts.google.com"),
        ("stefanb@us.ibm.com ", ISSUER),
        ("", ""),
    ] {
        let err = check(&b, &policy(root(), identity, issuer)).unwrap_err();
        assert!(
            matches!(err, OmsError::Untrusted { .. }),
            "{identity} {issuer}: {err}"
        );
    }
    // The right pair for another model only.
    let mut other = policy(root(), ID, ISSUER);
    other.entries[0].models = vec!["another-model".into()];
    assert!(matches!(
        check(&b, &other).unwrap_err(),
        OmsError::Untrusted { .. }
    ));
    // Keys and CA roots do not admit a keyless signature.
    let key_only = TrustPolicy::global_roots(vec![]);
    assert!(matches!(
        check(&b, &key_only).unwrap_err(),
        OmsError::Untrusted { .. }
    ));
}

#[test]
fn trust_root_decides_what_is_trusted() {
    let b = genuine();
    let p = |root: Value| policy(root_from(&root).unwrap(), ID, ISSUER);
    let base = production_root_json();

    // Without the Rekor key the entry proves nothing.
    let mut root = base.clone();
    root["tlogs"].as_array_mut().unwrap().remove(0);
    assert!(matches!(
        check(&b, &p(root)),
        Err(OmsError::TransparencyLog(_))
    ));

    // The Rekor key's validity must cover the integrated time (2025-10-10).
    let mut root = base.clone();
    root["tlogs"][0]["publicKey"]["validFor"] =
        serde_json::json!({"start": "2021-01-12T11:53:27Z", "end": "2025-10-01T00:00:00Z"});
    assert!(matches!(
        check(&b, &p(root)),
        Err(OmsError::TransparencyLog(_))
    ));

    // Without the current Fulcio CA, or with its window closed before the
    // signing time, the certificate does not chain.
    let mut root = base.clone();
    root["certificateAuthorities"]
        .as_array_mut()
        .unwrap()
        .remove(1);
    assert!(matches!(check(&b, &p(root)), Err(OmsError::Certificate(_))));
    let mut root = base.clone();
    root["certificateAuthorities"][1]["validFor"]["end"] = "2025-01-01T00:00:00Z".into();
    assert!(matches!(check(&b, &p(root)), Err(OmsError::Certificate(_))));

    // Without the CT log that signed the SCT.
    let mut root = base.clone();
    root["ctlogs"]
        .as_array_mut()
        .unwrap()
        .retain(|l| l["baseUrl"] != "https://ctfe.sigstore.dev/2022");
    let err = check(&b, &p(root)).unwrap_err();
    assert!(
        matches!(&err, OmsError::Certificate(m) if m.contains("SCT")),
        "{err}"
    );

    // A log id that is not the SHA-256 of the log's key: a broken root.
    let mut root = base.clone();
    root["tlogs"][0]["logId"]["keyId"] = STANDARD.encode([7u8; 32]).into();
    assert!(root_from(&root).is_err());

    // The client trust config form holds the same root.
    let config = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
        "trustedRoot": base,
        "signingConfig": {},
    });
    check(&b, &p(config)).unwrap();
}

#[test]
fn every_byte_of_every_signed_field_is_checked() {
    let b = genuine();
    let p = production_policy();
    check(&b, &p).unwrap();
    let mut fields: Vec<String> = [
        "/verificationMaterial/certificate/rawBytes",
        "/dsseEnvelope/payload",
        "/dsseEnvelope/signatures/0/sig",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for f in [
        "inclusionPromise/signedEntryTimestamp",
        "canonicalizedBody",
        "inclusionProof/rootHash",
        "logId/keyId",
    ] {
        fields.push(format!("{ENTRY}/{f}"));
    }
    fields.extend(proof_hash_fields(&b));
    let refused = |v: &Value| check(v, &p).is_err();
    let mut checked = flip_each_byte(&b, &fields, refused);
    // The checkpoint: every byte of the signed text, and of the signature.
    let note = b.pointer(CHECKPOINT).unwrap().as_str().unwrap().to_string();
    let (text, sig_line) = note.split_once("\n\n").unwrap();
    checked += flip_each_checkpoint_byte(&b, text.len(), refused);
    let (prefix, sig) = sig_line.trim_end().rsplit_once(' ').unwrap();
    let sig = STANDARD.decode(sig).unwrap();
    for at in 0..sig.len() {
        let mut s = sig.clone();
        s[at] ^= 0x01;
        let changed = format!("{text}\n\n{prefix} {}\n", STANDARD.encode(s));
        let mut tampered = b.clone();
        *tampered.pointer_mut(CHECKPOINT).unwrap() = Value::String(changed);
        assert!(
            check(&tampered, &p).is_err(),
            "checkpoint signature byte {at}: accepted"
        );
        checked += 1;
    }
    assert!(checked > 4000, "{checked}");
}

#[test]
fn log_entry_numbers_and_shape_are_checked() {
    let b = genuine();
    let p = production_policy();
    let set = |pointer: &str, value: Value| {
        let mut v = b.clone();
        *v.pointer_mut(&format!("{ENTRY}/{pointer}")).unwrap() = value;
        v
    };
    let log = |v: &Value| matches!(check(v, &p), Err(OmsError::TransparencyLog(_)));
    assert!(log(&set("integratedTime", "1760062341".into())));
    // A Rekor v1 entry without its integrated time (absent, or the
    // protobuf default 0) has no time its promise covers.
    assert!(log(&set("integratedTime", "0".into())));
    assert!(log(&edited(&b, ENTRY, |e| {
        e.as_object_mut().unwrap().remove("integratedTime");
    })));
    assert!(log(&set("logIndex", "598151087".into())));
    assert!(log(&set("inclusionProof/logIndex", "476246823".into())));
    assert!(log(&set("inclusionProof/treeSize", "476246826".into())));
    assert!(log(&set("kindVersion/kind", "intoto".into())));
    assert!(log(&set("kindVersion/version", "0.0.2".into())));
    assert!(log(&edited(&b, ENTRY, |e| {
        e.as_object_mut().unwrap().remove("inclusionPromise");
    })));
    assert!(log(&edited(&b, ENTRY, |e| {
        e.as_object_mut().unwrap().remove("inclusionProof");
    })));
    let mut v = b.clone();
    v["verificationMaterial"]["tlogEntries"] = Value::Array(vec![]);
    assert!(log(&v));
    // A proof one hash short or long.
    let hashes = format!("{ENTRY}/inclusionProof/hashes");
    assert!(log(&edited(&b, &hashes, |h| {
        h.as_array_mut().unwrap().pop();
    })));
    assert!(log(&edited(&b, &hashes, |h| {
        h.as_array_mut()
            .unwrap()
            .push(Value::String(STANDARD.encode([0u8; 32])));
    })));
    // Numbers past what the signed JSON can hold, or a time can: refused
    // as malformed, before any arithmetic on them.
    for (field, value) in [
        ("integratedTime", "9999999999999999999"),
        ("logIndex", "18446744073709551615"),
        ("inclusionProof/treeSize", "9007199254740993"),
    ] {
        assert!(
            matches!(
                check(&set(field, value.into()), &p),
                Err(OmsError::Bundle(_))
            ),
            "{field}"
        );
    }
    // A checkpoint padded with signature lines: the first line with the
    // log's key hint decides, so a bad one before the good one refuses.
    let pointer = format!("{ENTRY}/inclusionProof/checkpoint/envelope");
    let note = b.pointer(&pointer).unwrap().as_str().unwrap().to_string();
    let (text, line) = note.split_once("\n\n").unwrap();
    let (prefix, sig) = line.trim_end().rsplit_once(' ').unwrap();
    let mut bad_sig = STANDARD.decode(sig).unwrap();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 1;
    let padded = format!("{text}\n\n{prefix} {}\n{line}", STANDARD.encode(&bad_sig));
    let mut v = b.clone();
    *v.pointer_mut(&pointer).unwrap() = Value::String(padded);
    assert!(log(&v));
    // Bounds: more entries than allowed is a malformed bundle.
    let mut v = b.clone();
    let entry = v.pointer(ENTRY).unwrap().clone();
    v["verificationMaterial"]["tlogEntries"] = Value::Array(vec![entry; 9]);
    assert!(matches!(check(&v, &p), Err(OmsError::Bundle(_))));
}

#[test]
fn trust_config_file_names_sigstore_signers() {
    let tmp = tempfile::tempdir().unwrap();
    fs::copy(
        fixtures().join("production-trusted_root.json"),
        tmp.path().join("root.json"),
    )
    .unwrap();
    let good = format!(
        "[[signer]]\nmodels = [\"{MODEL}\"]\nsigstore_trust_root = \"root.json\"\n\
         sigstore_identities = [{{ identity = \"{ID}\", issuer = \"{ISSUER}\" }}]\n"
    );
    let p = TrustPolicy::parse(&good, tmp.path()).unwrap();
    check(&genuine(), &p).unwrap();
    for bad in [
        // Keyless without identities would trust any account anywhere.
        "[[signer]]\nmodels = [\"*\"]\nsigstore_trust_root = \"root.json\"\n".to_string(),
        format!("[[signer]]\nmodels = [\"*\"]\nsigstore_identities = [{{ identity = \"{ID}\", issuer = \"{ISSUER}\" }}]\n"),
        "[[signer]]\nmodels = [\"*\"]\nsigstore_trust_root = \"root.json\"\nsigstore_identities = [{ identity = \"\", issuer = \"x\" }]\n".to_string(),
        "[[signer]]\nmodels = [\"*\"]\nsigstore_trust_root = \"missing.json\"\nsigstore_identities = [{ identity = \"a\", issuer = \"b\" }]\n".to_string(),
        "[[signer]]\nmodels = [\"*\"]\nsigstore_trust_root = \"root.json\"\nsigstore_identities = [{ identity = \"a\" }]\n".to_string(),
    ] {
        assert!(TrustPolicy::parse(&bad, tmp.path()).is_err(), "{bad}");
    }
}

#[test]
fn ccnode_verify_cli_keyless() {
    let cli = |identity: &str| {
        Command::new(env!("CARGO_BIN_EXE_ccnode-verify"))
            .args(["model"])
            .arg(fixtures().join(MODEL))
            .arg("--signature")
            .arg(fixtures().join("v1.1.0-sigstore.sig"))
            .arg("--sigstore-trust-root")
            .arg(fixtures().join("production-trusted_root.json"))
            .args([
                "--identity",
                identity,
                "--identity-provider",
                ISSUER,
                "--json",
            ])
            .output()
            .unwrap()
    };
    let ok = cli(ID);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(out.to_string().contains(ID), "{out}");
    let refused = cli("someone@example.com");
    assert_eq!(refused.status.code(), Some(3));
    // The identity is required with a trust root, and meaningless without.
    let missing = Command::new(env!("CARGO_BIN_EXE_ccnode-verify"))
        .args(["model"])
        .arg(fixtures().join(MODEL))
        .arg("--signature")
        .arg(fixtures().join("v1.1.0-sigstore.sig"))
        .arg("--sigstore-trust-root")
        .arg(fixtures().join("production-trusted_root.json"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
}

// --- The private instance, judged by the reference verifier as well ---

struct Instance {
    venv: PathBuf,
    dir: PathBuf,
}

const ALICE: &str = "alice@example.com";
const TEST_ISSUER: &str = "https://issuer.test";

impl Instance {
    fn script(&self) -> Command {
        let mut c = Command::new(self.venv.join("bin/python"));
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/sigstore_instance.py"));
        c
    }

    fn new(venv: PathBuf, dir: PathBuf) -> Instance {
        let i = Instance { venv, dir };
        run(i.script().arg("instance").arg(&i.dir));
        i
    }

    fn sign(&self, model: &Path, sig: &Path, variant: &str, hash: &str) {
        run(self
            .script()
            .arg("sign")
            .arg(&self.dir)
            .arg(model)
            .arg(sig)
            .args(["--identity", ALICE, "--issuer", TEST_ISSUER])
            .args(["--variant", variant, "--hash", hash])
            .args(["--log-index-offset", "1000"]));
    }

    /// The reference verdict: Ok(()) verified, Err(message) refused.
    fn reference(
        &self,
        model: &Path,
        sig: &Path,
        identity: &str,
        issuer: &str,
        api: bool,
    ) -> Result<(), String> {
        let mut c = self.script();
        c.arg("verify").arg(&self.dir).arg(model).arg(sig).args([
            "--identity",
            identity,
            "--issuer",
            issuer,
        ]);
        if api {
            c.arg("--api");
        }
        let out = c.output().unwrap();
        match out.status.code() {
            Some(0) => Ok(()),
            Some(1) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
            _ => panic!(
                "reference misbehaved: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// ccnode's verdict: the signer it reports, or why it refused.
    fn ours(
        &self,
        model: &Path,
        sig: &Path,
        identity: &str,
        issuer: &str,
    ) -> Result<String, OmsError> {
        // The client trust config form, as the reference takes it.
        let root = TrustedRoot::load(&self.dir.join("trust_config.json")).unwrap();
        oms::verify_model(
            model,
            sig,
            &policy(root, identity, issuer),
            &VerifyOptions::new("m"),
        )
        .map(|m| m.signer)
    }
}

/// A Rekor v2 bundle from the private instance: every byte of the entry,
/// its checkpoint and its timestamp (the only time) is checked.
#[test]
fn rekor_v2_entry_every_byte_matters() {
    let Some(venv) = venv() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let inst = Instance::new(venv, tmp.path().join("instance"));
    let model = tmp.path().join("m");
    make_model(&model);
    let sig = tmp.path().join("v2.sig");
    inst.sign(&model, &sig, "v2", "sha256");
    let b: Value = serde_json::from_slice(&fs::read(&sig).unwrap()).unwrap();
    let root = TrustedRoot::load(&inst.dir.join("trust_config.json")).unwrap();
    let p = policy(root, ALICE, TEST_ISSUER);
    let check = |v: &Value| {
        let parsed = Bundle::parse(&serde_json::to_vec(v).unwrap())?;
        p.verify_bundle(&parsed, &VerifyOptions::new("m"))
    };
    let signer = check(&b).unwrap();
    assert!(signer.contains("https://rekor2.test"), "{signer}");

    let mut fields = vec![
        format!("{ENTRY}/canonicalizedBody"),
        format!("{ENTRY}/logId/keyId"),
        format!("{ENTRY}/inclusionProof/rootHash"),
        TIMESTAMP.to_string(),
    ];
    fields.extend(proof_hash_fields(&b));
    let refused = |v: &Value| check(v).is_err();
    let note_len = b.pointer(CHECKPOINT).unwrap().as_str().unwrap().len();
    let checked =
        flip_each_byte(&b, &fields, refused) + flip_each_checkpoint_byte(&b, note_len, refused);
    assert!(checked > 2000, "{checked}");

    // The same with the RSA authority's timestamp as the only time.
    let rsa_sig = tmp.path().join("v2_tsa_rsa.sig");
    inst.sign(&model, &rsa_sig, "v2_tsa_rsa", "sha256");
    let r: Value = serde_json::from_slice(&fs::read(&rsa_sig).unwrap()).unwrap();
    check(&r).unwrap();
    let flipped = flip_each_byte(&r, &[TIMESTAMP.to_string()], |v| {
        matches!(check(v), Err(OmsError::Timestamp(_)))
    });
    assert!(flipped > 1000, "{flipped}");

    // Shape: a v2 entry names its kind, carries its proof, and no time.
    let log = |v: &Value| matches!(check(v), Err(OmsError::TransparencyLog(_)));
    let set =
        |pointer: &str, value: Value| edited(&b, &format!("{ENTRY}/{pointer}"), |x| *x = value);
    assert!(log(&set("kindVersion/kind", "dsse".into())));
    assert!(log(&set("kindVersion/version", "0.0.1".into())));
    // The entry's index is its proof's (nothing else vouches for it).
    let index: u64 = b
        .pointer(&format!("{ENTRY}/logIndex"))
        .unwrap()
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(log(&set("logIndex", (index + 1).to_string().into())));
    assert!(log(&set(
        "inclusionProof/logIndex",
        (index + 1).to_string().into()
    )));
    // An integrated time without a signed entry timestamp is no time and
    // changes nothing (were it taken, the certificate would not be valid
    // then, 2023); with one, the entry is not what a v2 log writes.
    let unsigned = edited(&b, ENTRY, |e| {
        e["integratedTime"] = "1700000000".into();
    });
    assert_eq!(check(&unsigned).unwrap(), signer);
    let mut promised = unsigned.clone();
    promised.pointer_mut(ENTRY).unwrap()["inclusionPromise"] =
        serde_json::json!({"signedEntryTimestamp": STANDARD.encode([1u8; 70])});
    assert!(log(&promised));
    assert!(log(&edited(&b, ENTRY, |e| {
        e.as_object_mut().unwrap().remove("inclusionProof");
    })));
    // Without the timestamp there is no verified time.
    let mut v = b.clone();
    v["verificationMaterial"]["timestampVerificationData"] = serde_json::json!({});
    assert!(matches!(check(&v), Err(OmsError::Timestamp(_))));
    // The trust root decides: without the v2 log, or with its key's window
    // closed before the timestamp, the entry proves nothing.
    let mut config: Value =
        serde_json::from_slice(&fs::read(inst.dir.join("trust_config.json")).unwrap()).unwrap();
    let under = |config: &Value, bundle: &Value| {
        let root = TrustedRoot::parse(&serde_json::to_vec(config).unwrap()).unwrap();
        let p = policy(root, ALICE, TEST_ISSUER);
        let parsed = Bundle::parse(&serde_json::to_vec(bundle).unwrap()).unwrap();
        p.verify_bundle(&parsed, &VerifyOptions::new("m"))
    };
    // A trust root in the v0.2 form: the log id the SHA-256 of the key,
    // the note key id given as checkpointKeyId. Entries naming the log by
    // either verify; a checkpoint key id of another name does not.
    let tlogs = config["trustedRoot"]["tlogs"].clone();
    let spki = STANDARD
        .decode(tlogs[1]["publicKey"]["rawBytes"].as_str().unwrap())
        .unwrap();
    let spki_id = STANDARD.encode(<sha2::Sha256 as sha2::Digest>::digest(&spki));
    let mut v02 = config.clone();
    v02["trustedRoot"]["mediaType"] = "application/vnd.dev.sigstore.trustedroot.v0.2+json".into();
    v02["trustedRoot"]["tlogs"][1]["checkpointKeyId"] = tlogs[1]["logId"].clone();
    v02["trustedRoot"]["tlogs"][1]["logId"]["keyId"] = spki_id.clone().into();
    under(&v02, &b).unwrap();
    let by_spki = edited(&b, &format!("{ENTRY}/logId/keyId"), |v| {
        *v = spki_id.clone().into()
    });
    under(&v02, &by_spki).unwrap();
    let mut elsewhere = v02.clone();
    elsewhere["trustedRoot"]["tlogs"][1]["checkpointKeyId"]["keyId"] =
        STANDARD.encode([9u8; 32]).into();
    assert!(matches!(
        under(&elsewhere, &b),
        Err(OmsError::TransparencyLog(_))
    ));
    assert!(matches!(
        under(&elsewhere, &by_spki),
        Err(OmsError::TransparencyLog(_))
    ));

    config["trustedRoot"]["tlogs"][1]["publicKey"]["validFor"]["end"] =
        "2021-01-01T00:00:00Z".into();
    assert!(matches!(
        under(&config, &b),
        Err(OmsError::TransparencyLog(_))
    ));
    config["trustedRoot"]["tlogs"] = tlogs;
    config["trustedRoot"]["tlogs"]
        .as_array_mut()
        .unwrap()
        .remove(1);
    assert!(matches!(
        under(&config, &b),
        Err(OmsError::TransparencyLog(_))
    ));
}

#[test]
fn private_instance_verdicts_agree_with_the_reference() {
    let Some(venv) = venv() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let inst = Instance::new(venv, tmp.path().join("instance"));
    let model = tmp.path().join("m");
    make_model(&model);

    type Kind = fn(&OmsError) -> bool;
    let cert: Kind = |e| matches!(e, OmsError::Certificate(_));
    let log: Kind = |e| matches!(e, OmsError::TransparencyLog(_));
    let sig: Kind = |e| matches!(e, OmsError::BadSignature);
    let ts: Kind = |e| matches!(e, OmsError::Timestamp(_));
    // RFC 3161 timestamps come from OpenSSL's TSA. One that does not verify
    // (another TSA, other bytes) is set aside by both, so the log's time
    // still carries those; a verified one after the leaf expired is refused.
    // ESS: OpenSSL's TSA names its signer by a SHA-1 signingCertificate
    // (v1) when told, and a twin certificate (same key, issuer and serial,
    // other bytes) is told apart by the ESS hash alone, v2 or v1: ccnode
    // sets that timestamp aside.
    // Rekor v2 (hashedrekord 0.0.2, Ed25519 checkpoints, no time of its
    // own): the timestamp is the only time, so without a verified one there
    // is none, and both refuse.
    let cases: [(&str, Option<Kind>); 33] = [
        ("ok", None),
        ("expired", Some(cert)),
        ("not_yet_valid", Some(cert)),
        ("no_codesigning", Some(cert)),
        ("no_sct", Some(cert)),
        ("bad_sct", Some(cert)),
        ("untrusted_ca", Some(cert)),
        ("bad_set", Some(log)),
        ("bad_proof", Some(log)),
        ("bad_checkpoint", Some(log)),
        ("body_mismatch", Some(log)),
        ("wrong_payload_hash", Some(log)),
        ("wrong_key", Some(sig)),
        ("tsa", None),
        ("tsa_untrusted", None),
        ("tsa_other_message", None),
        ("tsa_after_expiry", Some(ts)),
        ("tsa_ess_v1", None),
        ("tsa_ess_other_cert", None),
        ("tsa_ess_v1_other_cert", None),
        ("tsa_rsa", None),
        ("v2", None),
        ("v2_ecdsa_log", None),
        ("v2_no_timestamp", Some(ts)),
        ("v2_untrusted_timestamp", Some(ts)),
        ("v2_tsa_rsa", None),
        ("v2_expired", Some(cert)),
        ("v2_bad_proof", Some(log)),
        ("v2_bad_checkpoint", Some(log)),
        ("v2_wrong_digest", Some(log)),
        ("v2_body_mismatch", Some(log)),
        ("v2_integrated_time", None),
        ("v2_with_set", Some(log)),
    ];
    for (variant, expected) in cases {
        let s = tmp.path().join(format!("{variant}.sig"));
        inst.sign(&model, &s, variant, "sha256");
        let ours = inst.ours(&model, &s, ALICE, TEST_ISSUER);
        let reference = inst.reference(&model, &s, ALICE, TEST_ISSUER, false);
        match expected {
            None => {
                let signer = ours.unwrap_or_else(|e| panic!("{variant}: ccnode refused: {e}"));
                reference.unwrap_or_else(|e| panic!("{variant}: reference refused: {e}"));
                // Only the instance's own timestamp counts as a time.
                assert_eq!(
                    signer.contains("timestamped"),
                    matches!(variant, "tsa" | "tsa_ess_v1" | "tsa_rsa")
                        || variant.starts_with("v2"),
                    "{variant}: {signer}"
                );
                let log = if variant.starts_with("v2") && variant != "v2_ecdsa_log" {
                    "https://rekor2.test"
                } else {
                    "https://rekor.test"
                };
                assert!(signer.contains(log), "{variant}: {signer}");
            }
            Some(kind) => {
                let e = ours.expect_err(variant);
                assert!(
                    kind(&e),
                    "{variant}: ccnode refused for another reason: {e}"
                );
                assert!(reference.is_err(), "{variant}: the reference accepted it");
            }
        }
    }

    // A checkpoint signed by the Ed25519 log's key under another origin
    // than the name its log id was made from: ccnode refuses it, as the
    // signed-note format binds a key to its name; sigstore-python 4.5.1
    // checks only the signature and accepts it (not asserted here).
    let s = tmp.path().join("v2_wrong_origin.sig");
    inst.sign(&model, &s, "v2_wrong_origin", "sha256");
    let e = inst.ours(&model, &s, ALICE, TEST_ISSUER).unwrap_err();
    assert!(log(&e), "v2_wrong_origin: {e}");
    // A trusted RSA authority with 1024-bit keys: ccnode verifies RSA of
    // 2048 bits and more only; a timestamp it cannot verify from an
    // authority of the trust root refuses the bundle, with Rekor v1 as
    // with v2 (the reference verifies it and accepts both).
    for variant in ["tsa_rsa1024", "v2_tsa_rsa1024"] {
        let s = tmp.path().join(format!("{variant}.sig"));
        inst.sign(&model, &s, variant, "sha256");
        let e = inst.ours(&model, &s, ALICE, TEST_ISSUER).unwrap_err();
        assert!(
            matches!(&e, OmsError::Timestamp(m) if m.contains("cannot verify")),
            "{variant}: {e}"
        );
    }

    // Identity and issuer, each wrong on its own.
    let good = tmp.path().join("ok.sig");
    for (identity, issuer) in [
        ("bob@example.com", TEST_ISSUER),
        (ALICE, "https://other.test"),
    ] {
        assert!(matches!(
            inst.ours(&model, &good, identity, issuer),
            Err(OmsError::Untrusted { .. })
        ));
        assert!(inst
            .reference(&model, &good, identity, issuer, false)
            .is_err());
    }

    // The model itself, changed after signing: both refuse.
    let changed = tmp.path().join("changed");
    copy_dir(&model, &changed);
    fs::write(changed.join("extra.json"), b"{}").unwrap();
    assert!(matches!(
        inst.ours(&changed, &good, ALICE, TEST_ISSUER),
        Err(OmsError::Mismatch { .. })
    ));
    assert!(inst
        .reference(&changed, &good, ALICE, TEST_ISSUER, false)
        .is_err());

    // The genuine signature, judged by both under the production root (the
    // instance's client trust config with its trusted root replaced).
    let mut config: Value =
        serde_json::from_slice(&fs::read(inst.dir.join("trust_config.json")).unwrap()).unwrap();
    config["trustedRoot"] = production_root_json();
    let production = Instance {
        venv: inst.venv.clone(),
        dir: tmp.path().join("production"),
    };
    fs::create_dir(&production.dir).unwrap();
    fs::write(
        production.dir.join("trust_config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let genuine_dir = tmp.path().join(MODEL);
    copy_dir(&fixtures().join(MODEL), &genuine_dir);
    let genuine_sig = fixtures().join("v1.1.0-sigstore.sig");
    production
        .ours(&genuine_dir, &genuine_sig, ID, ISSUER)
        .unwrap();
    production
        .reference(&genuine_dir, &genuine_sig, ID, ISSUER, false)
        .unwrap();
    let forged = tmp.path().join("forged.sig");
    let payload = edit_b64(&genuine(), "/dsseEnvelope/payload", |p| p[20] ^= 1);
    fs::write(&forged, serde_json::to_vec(&payload).unwrap()).unwrap();
    assert!(production.ours(&genuine_dir, &forged, ID, ISSUER).is_err());
    assert!(production
        .reference(&genuine_dir, &forged, ID, ISSUER, false)
        .is_err());
    assert!(production
        .ours(&genuine_dir, &genuine_sig, ALICE, ISSUER)
        .is_err());
    assert!(production
        .reference(&genuine_dir, &genuine_sig, ALICE, ISSUER, false)
        .is_err());

    // BLAKE3 (the reference's API: its CLI re-hashes with SHA-256).
    let b3 = tmp.path().join("blake3.sig");
    inst.sign(&model, &b3, "ok", "blake3");
    inst.ours(&model, &b3, ALICE, TEST_ISSUER).unwrap();
    inst.reference(&model, &b3, ALICE, TEST_ISSUER, true)
        .unwrap();
}
