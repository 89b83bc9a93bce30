//! A minimal OMS signer for development and test models: P-256 key
//! signing, `files` serialization, SHA-256, in the format the reference
//! `model_signing` tool writes (Sigstore bundle v0.3, DSSE envelope, in-toto
//! Statement v1, predicate `https://model_signing/signature/v1.0`) and
//! [`super::verify_model`] reads.
//!
//! Production models are signed with the reference tool; this signer exists
//! so that tests and the quick start have a real signed model without it.
//!
//! The directory is listed with the verifier's own walk ([`super::walk`]):
//! regular files only, recursively, sorted by name, `O_NOFOLLOW`; a
//! symbolic link or special file anywhere is an error. A top-level
//! [`SIGNATURE_FILE`] is left out and recorded in the signed
//! `ignore_paths`, as the reference CLI does for a signature inside the
//! model, so the signature may be written there afterwards.

use std::io::{Read as _, Write as _};
use std::path::Path;

use base64::Engine as _;
use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use sha2::{Digest, Sha256};

pub use p256::ecdsa::SigningKey;

use super::bundle::{pae, BUNDLE_MEDIA_TYPE, IN_TOTO_PAYLOAD_TYPE};
use super::hash::read_full_at;
use super::manifest::{HashType, Method, Serialization, PREDICATE_TYPE, STATEMENT_TYPE};
use super::{walk, OmsError};

/// The signature file's conventional name; left out of the signed files
/// when it lies at the top of the model directory.
pub const SIGNATURE_FILE: &str = "model.sig";

/// Read size when hashing.
const CHUNK: usize = 1 << 20;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Signs the model in `dir` with `key` and returns the signature file's
/// bytes (a Sigstore bundle). `model_name` is the statement's subject name.
///
/// Every regular file under `dir` is listed with its SHA-256, except a
/// top-level `model.sig`; symbolic links, special files, non-UTF-8 names
/// and a `dir` that is itself a symbolic link are refused (the same errors
/// [`super::verify_model`] gives). A file that changes size while it is
/// read is an [`OmsError::Changed`].
pub fn sign_dir_p256(dir: &Path, key: &SigningKey, model_name: &str) -> Result<Vec<u8>, OmsError> {
    use p256::ecdsa::signature::Signer as _;
    let serialization = Serialization {
        method: Method::Files,
        hash_type: HashType::Sha256,
        allow_symlinks: false,
        ignore_paths: vec![SIGNATURE_FILE.to_owned()],
    };
    let files = walk::walk(dir, &serialization, None)?;
    let mut subject = Sha256::new();
    let mut resources = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; CHUNK];
    for f in &files {
        let digest = hash_file(f, &mut buf)?;
        subject.update(digest);
        resources.push(serde_json::json!({
            "name": f.name,
            "algorithm": "sha256",
            "digest": hex::encode(digest),
        }));
    }
    let statement = serde_json::json!({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": hex::encode(subject.finalize())}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": false,
                "ignore_paths": serialization.ignore_paths,
            },
            "resources": resources,
        },
    });
    let payload = serde_json::to_vec_pretty(&statement)
        .map_err(|e| OmsError::Statement(format!("cannot serialise: {e}")))?;
    let signature: p256::ecdsa::Signature = key.sign(&pae(IN_TOTO_PAYLOAD_TYPE, &payload));
    let bundle = serde_json::json!({
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": hint(key)}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": B64.encode(&payload),
            "payloadType": IN_TOTO_PAYLOAD_TYPE,
            "signatures": [{"sig": B64.encode(signature.to_der().as_bytes()), "keyid": ""}],
        },
    });
    serde_json::to_vec(&bundle).map_err(|e| OmsError::Bundle(format!("cannot serialise: {e}")))
}

/// SHA-256 of one opened file, reading exactly the size it had when opened.
fn hash_file(f: &walk::ModelFile, buf: &mut [u8]) -> Result<[u8; 32], OmsError> {
    let io = |source| OmsError::Io {
        path: f.name.clone().into(),
        source,
    };
    let mut hasher = Sha256::new();
    let mut at = 0u64;
    while at < f.size {
        let want = usize::try_from(f.size - at).map_or(buf.len(), |left| left.min(buf.len()));
        let n = read_full_at(&f.file, &mut buf[..want], at).map_err(io)?;
        if n != want {
            return Err(OmsError::Changed(f.name.clone()));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    // Grown since it was opened: what was hashed is not the whole file.
    let mut probe = [0u8; 1];
    if read_full_at(&f.file, &mut probe, at).map_err(io)? != 0 {
        return Err(OmsError::Changed(f.name.clone()));
    }
    Ok(hasher.finalize().into())
}

/// The public key's PEM SubjectPublicKeyInfo (64-column lines, LF), the
/// form the reference tool reads and hashes for the bundle's hint.
pub fn public_key_pem(key: &SigningKey) -> String {
    key.verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a P-256 public key always encodes")
}

/// The `publicKey.hint` the reference tool writes for this key: SHA-256
/// (hex) of [`public_key_pem`]; equal to the verifier's
/// [`PublicKey::hint`](super::keys::PublicKey::hint), which re-encodes the DER the same way.
pub fn hint(key: &SigningKey) -> String {
    hex::encode(Sha256::digest(public_key_pem(key).as_bytes()))
}

/// The private key as an unencrypted PKCS#8 PEM (what `openssl pkcs8
/// -topk8 -nocrypt` writes and the reference tool's `--private_key` reads).
pub fn private_key_pem(key: &SigningKey) -> Result<String, OmsError> {
    p256::SecretKey::from(key)
        .to_pkcs8_pem(LineEnding::LF)
        .map(|pem| pem.as_str().to_owned())
        .map_err(|e| OmsError::TrustMaterial {
            what: "signing key".into(),
            reason: e.to_string(),
        })
}

/// A fresh key from the operating system's random number generator.
pub fn generate_key() -> SigningKey {
    SigningKey::random(&mut rand_core::OsRng)
}

/// A key derived from `seed`, for reproducible tests only: anyone who knows
/// the seed has the key.
pub fn key_from_seed(seed: u64) -> SigningKey {
    let mut counter = 0u32;
    loop {
        let mut h = Sha256::new();
        h.update(b"ccnode dev-model signing key v1\0");
        h.update(seed.to_le_bytes());
        h.update(counter.to_le_bytes());
        // Fails only for zero or a value >= the group order (about 2^-128).
        if let Ok(key) = SigningKey::from_slice(&h.finalize()) {
            return key;
        }
        counter += 1;
    }
}

/// Writes the public key PEM to `path` (created or replaced; mode 0644).
pub fn write_public_key_pem(path: &Path, key: &SigningKey) -> std::io::Result<()> {
    std::fs::write(path, public_key_pem(key))
}

/// Reads a PKCS#8 PEM P-256 private key (at most 64 KiB).
pub fn read_private_key_pem(path: &Path) -> Result<SigningKey, OmsError> {
    use p256::pkcs8::DecodePrivateKey as _;
    let io = |source| OmsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(io)?;
    p256::SecretKey::from_pkcs8_pem(&text)
        .map(SigningKey::from)
        .map_err(|e| OmsError::TrustMaterial {
            what: path.display().to_string(),
            reason: format!("not a PKCS#8 P-256 private key: {e}"),
        })
}

/// Writes the private key PEM to `path` with mode 0600: a new file
/// created next to it, then renamed over `path`, so the key is never
/// readable by others even for a moment and an existing file's wider mode
/// is not inherited.
pub fn write_private_key_pem(path: &Path, key: &SigningKey) -> Result<(), OmsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let pem = private_key_pem(key)?;
    let io = |source| OmsError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(pem.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oms::{self, PublicKey, TrustPolicy, VerifyOptions};
    use std::fs;

    fn model(dir: &Path) {
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("config.json"), b"{}\n").unwrap();
        fs::write(dir.join("sub/weights.dat"), vec![b'D'; 3 * CHUNK + 17]).unwrap();
        fs::write(dir.join("empty"), b"").unwrap();
    }

    fn policy(key: &SigningKey, model: &str) -> TrustPolicy {
        let public = PublicKey::from_pem(&public_key_pem(key)).unwrap();
        let mut p = TrustPolicy::global_key(public);
        p.entries[0].models = vec![model.into()];
        p
    }

    fn verify(dir: &Path, sig: &Path, key: &SigningKey, model: &str) -> Result<(), OmsError> {
        oms::verify_model(dir, sig, &policy(key, model), &VerifyOptions::new(model)).map(|_| ())
    }

    #[test]
    fn verifier_accepts_what_it_signs_and_refuses_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        model(&dir);
        let key = key_from_seed(1);
        let sig = tmp.path().join("model.sig");
        fs::write(&sig, sign_dir_p256(&dir, &key, "m").unwrap()).unwrap();
        let verified =
            oms::verify_model(&dir, &sig, &policy(&key, "m"), &VerifyOptions::new("m")).unwrap();
        let names: Vec<&str> = verified.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["config.json", "empty", "sub/weights.dat"]);

        // Another key, or the same key trusted for another model: refused.
        assert!(matches!(
            verify(&dir, &sig, &key_from_seed(2), "m"),
            Err(OmsError::KeyHint { .. })
        ));
        assert!(matches!(
            oms::verify_model(&dir, &sig, &policy(&key, "other"), &VerifyOptions::new("m")),
            Err(OmsError::Untrusted { .. })
        ));

        // One changed byte in the last chunk, an extra file, a missing file.
        let weights = dir.join("sub/weights.dat");
        let mut bytes = fs::read(&weights).unwrap();
        bytes[3 * CHUNK + 3] ^= 1;
        fs::write(&weights, &bytes).unwrap();
        assert!(
            matches!(verify(&dir, &sig, &key, "m"), Err(OmsError::Mismatch { mismatched, .. }) if mismatched == ["sub/weights.dat"])
        );
        bytes[3 * CHUNK + 3] ^= 1;
        fs::write(&weights, &bytes).unwrap();
        verify(&dir, &sig, &key, "m").unwrap();
        fs::write(dir.join("extra"), b"x").unwrap();
        assert!(
            matches!(verify(&dir, &sig, &key, "m"), Err(OmsError::Mismatch { extra, .. }) if extra == ["extra"])
        );
        fs::remove_file(dir.join("extra")).unwrap();
        fs::remove_file(dir.join("empty")).unwrap();
        assert!(
            matches!(verify(&dir, &sig, &key, "m"), Err(OmsError::Mismatch { missing, .. }) if missing == ["empty"])
        );
    }

    #[test]
    fn signature_may_live_inside_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        model(&dir);
        let key = key_from_seed(3);
        // A stale signature inside is not signed over, and a fresh one may
        // replace it.
        fs::write(dir.join(SIGNATURE_FILE), b"stale").unwrap();
        let bundle = sign_dir_p256(&dir, &key, "m").unwrap();
        fs::write(dir.join(SIGNATURE_FILE), &bundle).unwrap();
        verify(&dir, &dir.join(SIGNATURE_FILE), &key, "m").unwrap();
        // Also when the signature is kept elsewhere: the copy inside is an
        // ignored path, not an extra file.
        let outside = tmp.path().join("copy.sig");
        fs::write(&outside, &bundle).unwrap();
        verify(&dir, &outside, &key, "m").unwrap();
        // A model.sig deeper down is an ordinary file.
        fs::write(dir.join("sub").join(SIGNATURE_FILE), b"x").unwrap();
        assert!(matches!(
            verify(&dir, &outside, &key, "m"),
            Err(OmsError::Mismatch { .. })
        ));
    }

    #[test]
    fn bundle_format_matches_the_reference_tool() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        model(&dir);
        let key = key_from_seed(4);
        let bundle: serde_json::Value =
            serde_json::from_slice(&sign_dir_p256(&dir, &key, "my-model").unwrap()).unwrap();
        assert_eq!(bundle["mediaType"], BUNDLE_MEDIA_TYPE);
        let pem = public_key_pem(&key);
        assert_eq!(
            bundle["verificationMaterial"]["publicKey"]["hint"],
            hex::encode(Sha256::digest(pem.as_bytes()))
        );
        let env = &bundle["dsseEnvelope"];
        assert_eq!(env["payloadType"], IN_TOTO_PAYLOAD_TYPE);
        let payload = B64.decode(env["payload"].as_str().unwrap()).unwrap();
        let m = crate::oms::manifest::Manifest::from_payload(&payload).unwrap();
        assert_eq!(m.model_name, "my-model");
        assert_eq!(m.serialization.method, Method::Files);
        assert_eq!(m.serialization.hash_type, HashType::Sha256);
        assert_eq!(m.serialization.ignore_paths, [SIGNATURE_FILE]);
        assert_eq!(m.resources["config.json"], Sha256::digest(b"{}\n").to_vec());
        // Deterministic (RFC 6979): the same model and key sign the same.
        assert_eq!(
            sign_dir_p256(&dir, &key, "my-model").unwrap(),
            sign_dir_p256(&dir, &key, "my-model").unwrap()
        );
    }

    #[test]
    fn refuses_symlinks_special_files_and_missing_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        model(&dir);
        let key = key_from_seed(5);
        std::os::unix::fs::symlink("config.json", dir.join("sub/link")).unwrap();
        assert!(
            matches!(sign_dir_p256(&dir, &key, "m"), Err(OmsError::Symlink(p)) if p == "sub/link")
        );
        fs::remove_file(dir.join("sub/link")).unwrap();
        let link = tmp.path().join("mlink");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            sign_dir_p256(&link, &key, "m"),
            Err(OmsError::Symlink(_))
        ));
        nix::unistd::mkfifo(
            &dir.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(
            sign_dir_p256(&dir, &key, "m"),
            Err(OmsError::Entry { .. })
        ));
        assert!(matches!(
            sign_dir_p256(&tmp.path().join("absent"), &key, "m"),
            Err(OmsError::Io { .. })
        ));
    }

    #[test]
    fn keys_round_trip_and_seeded_keys_are_reproducible() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(key_from_seed(9).to_bytes(), key_from_seed(9).to_bytes());
        assert_ne!(key_from_seed(9).to_bytes(), key_from_seed(10).to_bytes());
        assert_ne!(generate_key().to_bytes(), generate_key().to_bytes());
        let key = key_from_seed(9);
        let path = tmp.path().join("key.pem");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        write_private_key_pem(&path, &key).unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            read_private_key_pem(&path).unwrap().to_bytes(),
            key.to_bytes()
        );
        assert!(fs::read_to_string(&path)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let public = tmp.path().join("key.pub.pem");
        write_public_key_pem(&public, &key).unwrap();
        let loaded = crate::oms::policy::load_public_key(&public).unwrap();
        assert_eq!(loaded.hint(), hint(&key));
        fs::write(
            &path,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        assert!(matches!(
            read_private_key_pem(&path),
            Err(OmsError::TrustMaterial { .. })
        ));
    }
}
