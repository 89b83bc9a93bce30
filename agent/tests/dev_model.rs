//! `ccnodectl dev-model`: the built binary writes a signed test model that
//! the model verifier (library and `ccnode-verify` CLI) accepts under the
//! written trust policy, and refuses once a byte changes.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ccnode_attest::oms::{self, OmsError, TrustPolicy, VerifyOptions};

const CCNODECTL: &str = env!("CARGO_BIN_EXE_ccnodectl");

fn dev_model(out: &Path, args: &[&str]) -> Output {
    Command::new(CCNODECTL)
        .arg("dev-model")
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn verify(out: &Path, model_id: &str) -> Result<oms::VerifiedModel, OmsError> {
    let policy = TrustPolicy::load(&out.join("trust-policy.toml")).unwrap();
    oms::verify_model(
        &out.join("model"),
        &out.join("model.sig"),
        &policy,
        &VerifyOptions::new(model_id),
    )
}

fn flip_last_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x01;
    fs::write(path, bytes).unwrap();
}

#[test]
fn writes_a_signed_model_that_verifies_and_refuses_a_changed_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev");
    let stdout = ok(dev_model(&out, &["--seed", "7", "--name", "test-model"]));
    assert!(stdout.contains("NOT for production"), "{stdout}");
    assert!(stdout.contains("test-model"), "{stdout}");
    assert_eq!(
        names(&out),
        [
            "model",
            "model.sig",
            "signing-key.pem",
            "signing-key.pub.pem",
            "trust-policy.toml"
        ]
    );
    assert_eq!(
        names(&out.join("model")),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let mode = fs::metadata(out.join("signing-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(fs::read_to_string(out.join("signing-key.pem"))
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));

    let model = verify(&out, "test-model").unwrap();
    let files: Vec<&str> = model.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        files,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    // The policy trusts the key for this model only.
    assert!(matches!(
        verify(&out, "another-model"),
        Err(OmsError::Untrusted { .. })
    ));
    // One flipped bit in the last weight: refused.
    flip_last_byte(&out.join("model/model.safetensors"));
    assert!(
        matches!(verify(&out, "test-model"), Err(OmsError::Mismatch { mismatched, .. }) if mismatched == ["model.safetensors"])
    );
}

#[test]
fn same_seed_same_files_and_random_keys_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    ok(dev_model(&a, &["--seed", "3"]));
    ok(dev_model(&b, &["--seed", "3"]));
    ok(dev_model(&c, &[]));
    ok(dev_model(&d, &[]));
    let read = |dir: &PathBuf, f: &str| fs::read(dir.join(f)).unwrap();
    for f in [
        "model/config.json",
        "model/tokenizer.json",
        "model/model.safetensors",
        "model.sig",
        "signing-key.pem",
        "signing-key.pub.pem",
        "trust-policy.toml",
    ] {
        assert_eq!(read(&a, f), read(&b, f), "{f}");
    }
    assert_ne!(read(&c, "signing-key.pem"), read(&d, "signing-key.pem"));
    assert_ne!(read(&a, "signing-key.pem"), read(&c, "signing-key.pem"));
    // Without --seed the weights are seed 0's; a different seed differs.
    assert_eq!(
        read(&c, "model/model.safetensors"),
        read(&d, "model/model.safetensors")
    );
    assert_ne!(
        read(&a, "model/model.safetensors"),
        read(&c, "model/model.safetensors")
    );
    verify(&c, "ccnode-dev-tiny").unwrap();
    verify(&d, "ccnode-dev-tiny").unwrap();
    // d's signature is not c's key's.
    fs::copy(d.join("model.sig"), c.join("model.sig")).unwrap();
    assert!(matches!(
        verify(&c, "ccnode-dev-tiny"),
        Err(OmsError::KeyHint { .. })
    ));
}

#[test]
fn refuses_a_non_empty_directory_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), b"mine").unwrap();
    let res = dev_model(&out, &[]);
    assert_eq!(res.status.code(), Some(1), "{}", text(&res.stderr));
    assert!(
        text(&res.stderr).contains("not empty"),
        "{}",
        text(&res.stderr)
    );
    assert_eq!(names(&out), ["notes.txt"]);

    ok(dev_model(&out, &["--force", "--seed", "1"]));
    // A stale file in an earlier model/ would be signed with the new model:
    // --force replaces model/ as a whole; other files are left alone.
    fs::write(out.join("model/stale.safetensors"), b"old").unwrap();
    ok(dev_model(&out, &["--force", "--seed", "2"]));
    assert_eq!(
        names(&out.join("model")),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(fs::read(out.join("notes.txt")).unwrap(), b"mine");
    verify(&out, "ccnode-dev-tiny").unwrap();
    // An out path that is a file.
    let res = dev_model(&out.join("notes.txt"), &[]);
    assert_eq!(res.status.code(), Some(1));
}

#[test]
fn bad_arguments_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev");
    for name in [
        "",
        "../up",
        "a b",
        "-x",
        ".hidden",
        "quote\"d",
        &"n".repeat(65),
    ] {
        let res = dev_model(&out, &[&format!("--name={name}")]);
        assert_eq!(res.status.code(), Some(1), "{name:?}");
        assert!(!out.exists(), "{name:?}");
    }
    let res = dev_model(&out, &["--size", "huge"]);
    assert_eq!(res.status.code(), Some(2));
    let res = dev_model(&out, &["--seed", "-1"]);
    assert_eq!(res.status.code(), Some(2));
    let res = Command::new(CCNODECTL).arg("dev-model").output().unwrap();
    assert_eq!(res.status.code(), Some(2), "--out is required");
    assert!(!out.exists());
}

#[test]
fn help_says_it_is_for_development_and_json_lists_what_was_written() {
    let help = Command::new(CCNODECTL)
        .args(["dev-model", "--help"])
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    let help = text(&help.stdout);
    assert!(help.contains("DEVELOPMENT AND TESTS ONLY"), "{help}");
    assert!(help.contains("model_signing"), "{help}");

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev");
    let json: serde_json::Value =
        serde_json::from_str(&ok(dev_model(&out, &["--json", "--name", "m1"]))).unwrap();
    assert_eq!(json["model_name"], "m1");
    assert_eq!(json["size"], "tiny");
    assert_eq!(json["key"], "random");
    assert_eq!(
        json["model_files"],
        serde_json::json!(["config.json", "model.safetensors", "tokenizer.json"])
    );
    assert_eq!(
        json["manifest_digest"].as_str().unwrap(),
        verify(&out, "m1").unwrap().manifest_digest
    );
    assert_eq!(
        json["signature"].as_str().unwrap(),
        out.join("model.sig").to_str().unwrap()
    );
}

/// `ccnode-verify`, built next to `ccnodectl` by a workspace build (as
/// `./scripts/test.sh` and CI do).
fn ccnode_verify() -> PathBuf {
    let p = Path::new(CCNODECTL).with_file_name("ccnode-verify");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace (cargo build --workspace) first",
        p.display()
    );
    p
}

#[test]
fn ccnode_verify_cli_accepts_it_and_refuses_a_changed_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev");
    ok(dev_model(&out, &["--name", "cli-model"]));
    let run = |model_id: &str| {
        Command::new(ccnode_verify())
            .arg("model")
            .arg(out.join("model"))
            .arg("--signature")
            .arg(out.join("model.sig"))
            .arg("--trust-config")
            .arg(out.join("trust-policy.toml"))
            .args(["--model-id", model_id])
            .output()
            .unwrap()
    };
    let res = run("cli-model");
    assert_eq!(res.status.code(), Some(0), "{}", text(&res.stderr));
    // Under another model id the key is not trusted.
    assert_eq!(run("other").status.code(), Some(3));
    // With the public key alone (any model id).
    let res = Command::new(ccnode_verify())
        .arg("model")
        .arg(out.join("model"))
        .arg("--signature")
        .arg(out.join("model.sig"))
        .arg("--public-key")
        .arg(out.join("signing-key.pub.pem"))
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(0), "{}", text(&res.stderr));
    flip_last_byte(&out.join("model/tokenizer.json"));
    assert_eq!(run("cli-model").status.code(), Some(1));
}
