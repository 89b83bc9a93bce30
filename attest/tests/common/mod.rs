//! Shared helpers for the OMS tests: model generation, tampering, and a
//! minimal signer (P-256, files/sha256) so tests that do not need the
//! reference tool run without it.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use sha2::{Digest, Sha256};

pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A small valid safetensors file: two F32 tensors and one BF16.
pub fn safetensors_bytes() -> Vec<u8> {
    let header = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend((0..22u8).map(|i| i.wrapping_mul(7)));
    out
}

/// Writes the standard test model: nested directories, an empty file,
/// non-ASCII names, a safetensors file and a multi-shard data file.
pub fn make_model(dir: &Path) {
    fs::create_dir_all(dir.join("nested/deeper")).unwrap();
    fs::create_dir_all(dir.join("weights")).unwrap();
    fs::write(dir.join("config.json"), b"{\"hidden\": 8}\n").unwrap();
    fs::write(dir.join("empty"), b"").unwrap();
    fs::write(
        dir.join("nested/deeper/\u{fc}-d\u{e9}j\u{e0}.txt"),
        "non-ASCII name \u{2713}\n",
    )
    .unwrap();
    fs::write(dir.join("weights/model.safetensors"), safetensors_bytes()).unwrap();
    // 3500 bytes: four shards of 1000. Starts with 'D' (no pickle magic).
    let data: Vec<u8> = (0..3500u32)
        .map(|i| {
            if i == 0 {
                b'D'
            } else {
                (i.wrapping_mul(2654435761) >> 13) as u8
            }
        })
        .collect();
    fs::write(dir.join("nested/data.dat"), data).unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

pub fn flip_byte(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    fs::write(path, bytes).unwrap();
}

/// Runs a command, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generates an EC key pair with openssl: (private PKCS#8 PEM, public PEM).
pub fn ec_key(dir: &Path, name: &str, curve: &str) -> (PathBuf, PathBuf) {
    let tmp = dir.join(format!("{name}.ec"));
    let key = dir.join(format!("{name}.key"));
    let pubkey = dir.join(format!("{name}.pub"));
    run(Command::new("openssl")
        .args(["ecparam", "-name", curve, "-genkey", "-noout", "-out"])
        .arg(&tmp));
    run(Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-in"])
        .arg(&tmp)
        .arg("-out")
        .arg(&key));
    run(Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&pubkey));
    (key, pubkey)
}

/// Replaces the bundle's DSSE payload (re-encoded) without re-signing,
/// after `edit` changed its text.
pub fn edit_payload(sig: &Path, out: &Path, edit: impl Fn(String) -> String) {
    let mut bundle: serde_json::Value = serde_json::from_slice(&fs::read(sig).unwrap()).unwrap();
    let env = &mut bundle["dsseEnvelope"];
    let payload = String::from_utf8(B64.decode(env["payload"].as_str().unwrap()).unwrap()).unwrap();
    let edited = edit(payload.clone());
    assert_ne!(edited, payload, "the edit changed nothing");
    env["payload"] = B64.encode(edited).into();
    fs::write(out, serde_json::to_vec(&bundle).unwrap()).unwrap();
}

/// Signs `dir` (files, sha256, no ignore paths) with a deterministic P-256
/// key in the reference tool's format; returns (bundle bytes, public PEM).
pub fn sign_locally(dir: &Path, seed: u8) -> (Vec<u8>, String) {
    sign_locally_with(dir, seed, false)
}

/// [`sign_locally`], choosing `allow_symlinks` (links are listed under
/// their own names with their targets' content, as the reference tool does).
/// Without symlinks this is the library's signer
/// ([`ccnode_attest::oms::sign::sign_dir_p256`], subject name `local`),
/// which refuses links; with them, a local variant of it.
pub fn sign_locally_with(dir: &Path, seed: u8, allow_symlinks: bool) -> (Vec<u8>, String) {
    use ccnode_attest::oms::sign;
    use p256::ecdsa::signature::Signer as _;
    let key = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
    let pem = sign::public_key_pem(&key);
    if !allow_symlinks {
        return (sign::sign_dir_p256(dir, &key, "local").unwrap(), pem);
    }
    let mut files = Vec::new();
    collect(dir, dir, &mut files);
    files.sort();
    let mut subject = Sha256::new();
    let resources: Vec<serde_json::Value> = files
        .iter()
        .map(|rel| {
            let digest = Sha256::digest(fs::read(dir.join(rel)).unwrap());
            subject.update(digest);
            serde_json::json!({"name": rel, "algorithm": "sha256", "digest": hex::encode(digest)})
        })
        .collect();
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "local", "digest": {"sha256": hex::encode(subject.finalize())}}],
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": true},
            "resources": resources,
        },
    });
    let payload = serde_json::to_vec_pretty(&statement).unwrap();
    let pae = ccnode_attest::oms::bundle::pae("application/vnd.in-toto+json", &payload);
    let sig: p256::ecdsa::Signature = key.sign(&pae);
    let bundle = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": sign::hint(&key)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": B64.encode(&payload),
            "payloadType": "application/vnd.in-toto+json",
            "signatures": [{"sig": B64.encode(sig.to_der().as_bytes()), "keyid": ""}],
        },
    });
    (serde_json::to_vec(&bundle).unwrap(), pem)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            collect(root, &entry.path(), out);
        } else {
            out.push(
                entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
}

/// Issues a P-256 certificate with openssl: self-signed when `issuer` is
/// `None`; `ext` is an openssl extension file's text. Returns the PEM path;
/// the key is at `<name>.key`.
pub fn issue_cert(dir: &Path, name: &str, issuer: Option<&str>, ext: &str) -> PathBuf {
    let (key, _) = ec_key(dir, name, "prime256v1");
    let pem = dir.join(format!("{name}.pem"));
    let extfile = dir.join(format!("{name}.ext"));
    fs::write(&extfile, ext).unwrap();
    match issuer {
        None => run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-key"])
            .arg(&key)
            .args(["-subj", &format!("/CN={name}"), "-days", "30", "-out"])
            .arg(&pem)
            .args(["-extensions", "v3", "-config"])
            .arg(config_with(dir, name, ext))),
        Some(issuer) => {
            let csr = dir.join(format!("{name}.csr"));
            run(Command::new("openssl")
                .args(["req", "-new", "-key"])
                .arg(&key)
                .args(["-subj", &format!("/CN={name}"), "-out"])
                .arg(&csr));
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "10", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(dir.join(format!("{issuer}.pem")))
                .arg("-CAkey")
                .arg(dir.join(format!("{issuer}.key")))
                .arg("-extfile")
                .arg(&extfile)
                .args(["-set_serial", &(name.len() * 7919 + 17).to_string(), "-out"])
                .arg(&pem))
        }
    };
    pem
}

fn config_with(dir: &Path, name: &str, ext: &str) -> PathBuf {
    let cfg = dir.join(format!("{name}.cnf"));
    fs::write(
        &cfg,
        format!("[req]\ndistinguished_name = dn\n[dn]\n[v3]\n{ext}"),
    )
    .unwrap();
    cfg
}

/// Signs `dir` like [`sign_locally`] but with the PKCS#8 key at `key` and
/// the given DER certificate chain in the bundle (signing certificate
/// first).
pub fn sign_with_chain(dir: &Path, key: &Path, chain: &[Vec<u8>]) -> Vec<u8> {
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::DecodePrivateKey as _;
    let secret = p256::SecretKey::from_pkcs8_pem(&fs::read_to_string(key).unwrap()).unwrap();
    let signing = p256::ecdsa::SigningKey::from(secret);
    let (bundle, _) = sign_locally(dir, 1);
    let mut bundle: serde_json::Value = serde_json::from_slice(&bundle).unwrap();
    let payload = B64
        .decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap())
        .unwrap();
    let pae = ccnode_attest::oms::bundle::pae("application/vnd.in-toto+json", &payload);
    let sig: p256::ecdsa::Signature = signing.sign(&pae);
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = B64.encode(sig.to_der().as_bytes()).into();
    let certs: Vec<serde_json::Value> = chain
        .iter()
        .map(|der| serde_json::json!({"rawBytes": B64.encode(der)}))
        .collect();
    bundle["verificationMaterial"] =
        serde_json::json!({"x509CertificateChain": {"certificates": certs}, "tlogEntries": []});
    serde_json::to_vec(&bundle).unwrap()
}

/// The DER of the first certificate in a PEM file.
pub fn pem_to_der(pem: &Path) -> Vec<u8> {
    let text = fs::read_to_string(pem).unwrap();
    let (_, der) = der::pem::decode_vec(text.trim().as_bytes()).unwrap();
    der
}

/// The virtual environment holding the reference tool (CCNODE_VENV, default
/// `<repo>/.venv`). Without it the tests fail under CI=true and say so
/// loudly otherwise.
pub fn venv() -> Option<PathBuf> {
    let dir = std::env::var_os("CCNODE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    if dir.join("bin/model_signing").exists() {
        return Some(dir);
    }
    let msg = format!(
        "no model_signing in the virtual environment {} (scripts/test.sh creates it; or set CCNODE_VENV)",
        dir.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}
