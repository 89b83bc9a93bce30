//! OpenSSF model signing (OMS): offline verification of the signatures the
//! `model_signing` tool writes, and hand-over of exactly the verified bytes.
//!
//! The flow, in [`verify_model`]:
//!
//! 1. the signature file (at most [`bundle::MAX_SIGNATURE_FILE`] bytes) is
//!    parsed as a Sigstore bundle v0.3 holding a DSSE envelope;
//! 2. the DSSE signature is checked over the pre-authentication encoding of
//!    the payload bytes exactly as they were signed (never re-serialised),
//!    with a key or certificate chain the [`policy::TrustPolicy`] allows for
//!    this model;
//! 3. the payload is parsed as an in-toto Statement v1 with the model-signing
//!    v1.0 predicate, and the subject digest is checked against the listed
//!    resources ([`manifest`]);
//! 4. the model directory is walked relative to a directory fd, each entry
//!    opened with `O_NOFOLLOW`, regular files only; symlinks only when the
//!    signature allows them, resolved beneath the model ([`walk`]);
//! 5. each file is read once, in parallel (files or shards across cores,
//!    BLAKE3 chunks across cores too): every chunk is hashed and written to
//!    a memfd, which is sealed when complete ([`hash`]; with
//!    [`HandOver::VerdictOnly`] nothing is copied); the resulting manifest
//!    is compared with the signed one as a map keyed by resource name;
//! 6. pickle files are refused and safetensors headers checked
//!    ([`safetensors`]) on the sealed bytes.
//!
//! The result, [`VerifiedModel`], holds one sealed read-only memfd per file:
//! what a worker reads from it is what was hashed, whatever happens to the
//! files on disk afterwards.
//!
//! [`sign`] is a minimal signer in the same format (P-256 key, files,
//! SHA-256) for development and test models; production models are signed
//! with the reference `model_signing` tool.

pub mod bundle;
pub mod cert;
pub mod hash;
pub mod keys;
pub mod manifest;
mod mapped;
pub mod pickle;
pub mod policy;
pub mod safetensors;
pub mod sign;
pub mod sigstore;
mod tsa;
pub mod walk;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use hash::{HandOver, VerifiedFile, VerifiedModel};
pub use keys::PublicKey;
pub use policy::TrustPolicy;

/// Why a model failed verification. Variants are stable: callers (exit
/// codes, metrics labels) match on them, never on the message text.
///
/// Messages pass every name and detail through [`printable`]: they carry
/// file names from the model directory and strings from the signature
/// bundle, and they end up in log lines, audit records and terminals.
#[derive(Debug, thiserror::Error)]
pub enum OmsError {
    /// Reading the signature, a key, a certificate or a model file failed.
    #[error("cannot read {}", printable(&.path.to_string_lossy()))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An input exceeds one of the bounds this module enforces.
    #[error("{what} too large: {found} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        found: u64,
        limit: u64,
    },
    /// The signature file is not a well-formed Sigstore bundle with a DSSE
    /// envelope.
    #[error("malformed signature bundle: {}", printable(.0))]
    Bundle(String),
    /// The DSSE payload is not a model-signing v1.0 in-toto statement.
    #[error("malformed signed statement: {}", printable(.0))]
    Statement(String),
    /// The statement's subject digest does not match its resources.
    #[error("statement subject digest does not match its resources")]
    SubjectDigest,
    /// A key or certificate in the trust configuration is unusable.
    #[error("unusable trust material {}: {}", printable(.what), printable(.reason))]
    TrustMaterial { what: String, reason: String },
    /// The bundle names a public key other than the configured one.
    #[error("public key hint {} does not match the configured key {}", printable(.found), printable(.expected))]
    KeyHint { expected: String, found: String },
    /// The DSSE signature does not verify under any allowed key.
    #[error("signature does not verify under any trusted key")]
    BadSignature,
    /// The signing certificate is not acceptable.
    #[error("signing certificate refused: {}", printable(.0))]
    Certificate(String),
    /// A keyless signature's transparency-log entry does not prove what it
    /// must (log not trusted, signed entry timestamp, inclusion proof,
    /// checkpoint, or a body about another signature).
    #[error("transparency log entry refused: {}", printable(.0))]
    TransparencyLog(String),
    /// A keyless signature's RFC 3161 timestamps cannot be used: more or
    /// other than the trust root allows, or a verified timestamp at which
    /// the signing certificate was not valid.
    #[error("timestamp refused: {}", printable(.0))]
    Timestamp(String),
    /// No trust policy entry covers this model and signer.
    #[error("no trust policy entry allows signer {} for model {}", printable(.signer), printable(.model))]
    Untrusted { model: String, signer: String },
    /// The signature verifies, but the trust policy entry requires the
    /// statement to name the model verified, and it names another.
    #[error("the signed statement is for model {}, not {} (subject_is_model)", printable(.name), printable(.model))]
    SubjectName { model: String, name: String },
    /// The signature was made with a method ccnode does not verify offline.
    #[error("unsupported signing method: {}", printable(.0))]
    UnsupportedMethod(String),
    /// The model directory holds a symbolic link the signature does not allow.
    #[error("symbolic link refused: {}", printable(.0))]
    Symlink(String),
    /// The model directory holds something that is neither a regular file nor
    /// a directory, or a name that is not UTF-8.
    #[error("unsupported entry in model directory: {}: {reason}", printable(.path))]
    Entry { path: String, reason: &'static str },
    /// A file changed size while it was being read.
    #[error("file changed while being read: {}", printable(.0))]
    Changed(String),
    /// The files on disk do not match the signed manifest.
    #[error("model does not match its signature: {}", describe_mismatch(.extra, .missing, .mismatched))]
    Mismatch {
        extra: Vec<String>,
        missing: Vec<String>,
        mismatched: Vec<String>,
    },
    /// A file is in a pickle-based format, or in an archive or compressed
    /// format a pickle may hide in.
    #[error("pickle-based file refused: {} ({why})", printable(.path))]
    Pickle { path: String, why: &'static str },
    /// A safetensors file has an invalid header.
    #[error("invalid safetensors file {}: {}", printable(.path), printable(.reason))]
    Safetensors { path: String, reason: String },
    /// Creating or sealing the in-memory copy failed.
    #[error("cannot create sealed copy")]
    Memfd(#[source] std::io::Error),
}

/// Raises this process's soft open-file limit to its hard one, and returns
/// the limit now in force. A verification holds every model file open at
/// once (up to [`walk::MAX_FILES`]), and a sealed copy a memfd for each
/// besides: under systemd's default soft limit of 1024 a model of 500
/// files would fail with EMFILE. Programs that verify models call this
/// once at start (ccnoded, ccnode-verify).
pub fn raise_open_file_limit() -> nix::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// How many names of each kind a mismatch message lists.
const MISMATCH_NAMES_SHOWN: usize = 32;

fn describe_mismatch(extra: &[String], missing: &[String], mismatched: &[String]) -> String {
    let mut parts = Vec::new();
    for (label, list) in [
        ("extra", extra),
        ("missing", missing),
        ("mismatched", mismatched),
    ] {
        if !list.is_empty() {
            let shown: Vec<_> = list
                .iter()
                .take(MISMATCH_NAMES_SHOWN)
                .map(|n| printable(n))
                .collect();
            let more = list.len().saturating_sub(MISMATCH_NAMES_SHOWN);
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            parts.push(format!("{label} {}{tail}", shown.join(", ")));
        }
    }
    parts.join("; ")
}

/// `s` safe to print on a terminal or in a log line: control characters
/// (newlines, escape sequences), line and paragraph separators, zero-width
/// characters and Unicode bidirectional controls, which
/// file names and signed model names may carry, are written as `\u{…}`
/// escapes; anything else, non-ASCII names included, is unchanged.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let hostile = |c: char| {
        c.is_control()
            || matches!(
                c,
                '\u{061c}'
                    | '\u{200b}'..='\u{200f}'
                    | '\u{2028}'..='\u{202e}'
                    | '\u{2060}'..='\u{2069}'
                    | '\u{feff}'
            )
    };
    if !s.chars().any(hostile) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hostile(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

impl OmsError {
    /// A short, stable label for metrics and JSON output.
    pub fn kind(&self) -> &'static str {
        match self {
            OmsError::Io { .. } => "io",
            OmsError::TooLarge { .. } => "too_large",
            OmsError::Bundle(_) => "bundle",
            OmsError::Statement(_) => "statement",
            OmsError::SubjectDigest => "subject_digest",
            OmsError::TrustMaterial { .. } => "trust_material",
            OmsError::KeyHint { .. } => "key_hint",
            OmsError::BadSignature => "bad_signature",
            OmsError::Certificate(_) => "certificate",
            OmsError::TransparencyLog(_) => "transparency_log",
            OmsError::Timestamp(_) => "timestamp",
            OmsError::Untrusted { .. } => "untrusted",
            OmsError::SubjectName { .. } => "subject_name",
            OmsError::UnsupportedMethod(_) => "unsupported_method",
            OmsError::Symlink(_) => "symlink",
            OmsError::Entry { .. } => "entry",
            OmsError::Changed(_) => "changed",
            OmsError::Mismatch { .. } => "mismatch",
            OmsError::Pickle { .. } => "pickle",
            OmsError::Safetensors { .. } => "safetensors",
            OmsError::Memfd(_) => "memfd",
        }
    }
}

/// Reads a small trusted or untrusted file with a size bound.
pub(crate) fn read_bounded(
    path: &Path,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, OmsError> {
    read_bounded_with_id(path, what, limit).map(|(bytes, _)| bytes)
}

/// [`read_bounded`], with the (dev, ino) of the file that was read.
fn read_bounded_with_id(
    path: &Path,
    what: &'static str,
    limit: u64,
) -> Result<(Vec<u8>, (u64, u64)), OmsError> {
    let io = |source| OmsError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let (size, id) = (meta.len(), (meta.dev(), meta.ino()));
    if size > limit {
        return Err(OmsError::TooLarge {
            what,
            found: size,
            limit,
        });
    }
    let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > limit {
        return Err(OmsError::TooLarge {
            what,
            found: buf.len() as u64,
            limit,
        });
    }
    Ok((buf, id))
}

/// Options for one verification.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The model's identity in the trust policy (per-model entries match it).
    pub model_id: String,
    /// The time certificates must be valid at.
    pub now: SystemTime,
}

impl VerifyOptions {
    pub fn new(model_id: impl Into<String>) -> Self {
        VerifyOptions {
            model_id: model_id.into(),
            now: SystemTime::now(),
        }
    }
}

/// Verifies the model in `dir` against the signature file at `signature`
/// under `policy`, and returns the verified bytes as sealed memfds.
pub fn verify_model(
    dir: &Path,
    signature: &Path,
    policy: &TrustPolicy,
    options: &VerifyOptions,
) -> Result<VerifiedModel, OmsError> {
    verify_model_with(dir, signature, policy, options, HandOver::SealedCopy)
}

/// [`verify_model`], choosing whether the bytes are copied into sealed
/// memfds ([`HandOver::SealedCopy`]) or only a verdict is wanted
/// ([`HandOver::VerdictOnly`]: nothing to hand over, no copy made).
pub fn verify_model_with(
    dir: &Path,
    signature: &Path,
    policy: &TrustPolicy,
    options: &VerifyOptions,
    hand_over: HandOver,
) -> Result<VerifiedModel, OmsError> {
    // The signature file itself is skipped when it lies inside the model
    // directory (the reference CLI does the same), recognised by the
    // identity of the file that was read, not by a second lookup.
    let (bytes, sig_id) =
        read_bounded_with_id(signature, "signature file", bundle::MAX_SIGNATURE_FILE)?;
    let sig_id = Some(sig_id);
    let parsed = bundle::Bundle::parse(&bytes)?;
    let signer = policy.verify_bundle(&parsed, options)?;
    let manifest = manifest::Manifest::from_payload(&parsed.payload)?;
    let files = walk::walk(dir, &manifest.serialization, sig_id)?;
    hash::hash_and_seal(files, manifest, signer, hand_over)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_could_forge_a_line() {
        assert!(matches!(
            printable("weights/\u{fc}ber.safetensors"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            printable("a\nverified: model x\u{1b}[2K\u{202e}"),
            "a\\u{a}verified: model x\\u{1b}[2K\\u{202e}"
        );
        assert_eq!(printable("a\u{200b}b\u{2028}"), "a\\u{200b}b\\u{2028}");
    }

    #[test]
    fn every_message_escapes_names() {
        let hostile = "a\nINFO verified\u{1b}[2K\u{202e}";
        let escaped = "a\\u{a}INFO verified\\u{1b}[2K\\u{202e}";
        let errors = [
            OmsError::Io {
                path: hostile.into(),
                source: std::io::Error::other("gone"),
            },
            OmsError::Bundle(hostile.into()),
            OmsError::Statement(hostile.into()),
            OmsError::TrustMaterial {
                what: hostile.into(),
                reason: hostile.into(),
            },
            OmsError::KeyHint {
                expected: hostile.into(),
                found: hostile.into(),
            },
            OmsError::Certificate(hostile.into()),
            OmsError::TransparencyLog(hostile.into()),
            OmsError::Timestamp(hostile.into()),
            OmsError::Untrusted {
                model: hostile.into(),
                signer: hostile.into(),
            },
            OmsError::SubjectName {
                model: hostile.into(),
                name: hostile.into(),
            },
            OmsError::UnsupportedMethod(hostile.into()),
            OmsError::Symlink(hostile.into()),
            OmsError::Entry {
                path: hostile.into(),
                reason: "a fifo",
            },
            OmsError::Changed(hostile.into()),
            OmsError::Pickle {
                path: hostile.into(),
                why: "a name",
            },
            OmsError::Safetensors {
                path: hostile.into(),
                reason: hostile.into(),
            },
        ];
        for err in errors {
            let text = err.to_string();
            assert!(text.contains(escaped), "{text}");
            assert!(!text.contains(['\n', '\u{1b}', '\u{202e}']), "{text}");
        }
    }

    #[test]
    fn a_mismatch_message_is_bounded_and_escaped() {
        let many: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        let text = OmsError::Mismatch {
            extra: many,
            missing: vec!["x\ny".into()],
            mismatched: Vec::new(),
        }
        .to_string();
        assert!(text.contains("f31 and 68 more"), "{text}");
        assert!(!text.contains("f32,"), "{text}");
        assert!(text.contains("missing x\\u{a}y"), "{text}");
        assert!(!text.contains('\n'));
    }
}
