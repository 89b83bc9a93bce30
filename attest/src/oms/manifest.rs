//! The signed payload: an in-toto Statement v1 with the model-signing v1.0
//! predicate, parsed from the exact payload bytes into a [`Manifest`].

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::OmsError;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";

/// Most resources a manifest may list.
pub const MAX_RESOURCES: usize = 1_000_000;
/// Longest resource name (bytes).
pub const MAX_NAME: usize = 4096;
/// Most ignore_paths entries.
pub const MAX_IGNORE_PATHS: usize = 1024;

/// Hash algorithms the format uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashType {
    Sha256,
    Blake2b,
    Blake3,
}

impl HashType {
    fn parse(s: &str) -> Option<HashType> {
        match s {
            "sha256" => Some(HashType::Sha256),
            "blake2b" => Some(HashType::Blake2b),
            "blake3" => Some(HashType::Blake3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashType::Sha256 => "sha256",
            HashType::Blake2b => "blake2b",
            HashType::Blake3 => "blake3",
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashType::Sha256 | HashType::Blake3 => 32,
            HashType::Blake2b => 64,
        }
    }
}

/// How the model was cut into resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// One resource per file, named by its path.
    Files,
    /// One resource per shard of at most `shard_size` bytes, named
    /// `path:start:end`; empty files have no shard.
    Shards { shard_size: u64 },
}

/// The serialization parameters, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serialization {
    pub method: Method,
    pub hash_type: HashType,
    pub allow_symlinks: bool,
    /// Relative paths (files or directories) left out of the manifest.
    pub ignore_paths: Vec<String>,
}

impl Serialization {
    /// Whether `rel` (a model-relative path) lies at or under an ignored path.
    /// Ignored paths are compared component-wise, as Python's
    /// `Path.is_relative_to` does; entries that are absolute or climb out of
    /// the model never match.
    pub fn is_ignored(&self, rel: &str) -> bool {
        self.ignore_paths.iter().any(|ignored| {
            let ig: Vec<&str> = ignored
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            if ig.is_empty() || ignored.starts_with('/') || ig.contains(&"..") {
                return false;
            }
            let mut parts = rel.split('/');
            ig.iter().all(|c| parts.next() == Some(c))
        })
    }

    /// The resource `algorithm` field this serialization produces.
    pub fn algorithm(&self) -> String {
        match self.method {
            Method::Files => self.hash_type.name().to_string(),
            Method::Shards { shard_size } => {
                format!("{}-sharded-{shard_size}", self.hash_type.name())
            }
        }
    }
}

/// The verified statement: model name, serialization, and the resources as a
/// map keyed by name.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub model_name: String,
    /// SHA-256 over the resource digests in signed order (hex): the model's
    /// manifest digest, recorded for attestation claims.
    pub digest: String,
    pub serialization: Serialization,
    pub resources: BTreeMap<String, Vec<u8>>,
}

#[derive(Deserialize)]
struct RawStatement {
    #[serde(rename = "_type")]
    type_: String,
    subject: Vec<RawSubject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: RawPredicate,
}

/// The subject name of a verified statement, read alone (a trust policy
/// entry may require it to be the model's id before the rest is parsed).
pub fn subject_name(payload: &[u8]) -> Result<String, OmsError> {
    #[derive(Deserialize)]
    struct Named {
        subject: Vec<NameOnly>,
    }
    #[derive(Deserialize)]
    struct NameOnly {
        name: String,
    }
    let named: Named = serde_json::from_slice(payload)
        .map_err(|e| OmsError::Statement(format!("subject: {e}")))?;
    let [subject] = <[NameOnly; 1]>::try_from(named.subject)
        .map_err(|s| OmsError::Statement(format!("{} subjects, expected one", s.len())))?;
    Ok(subject.name)
}

#[derive(Deserialize)]
struct RawSubject {
    name: String,
    digest: RawSubjectDigest,
}

#[derive(Deserialize)]
struct RawSubjectDigest {
    sha256: String,
}

#[derive(Deserialize)]
struct RawPredicate {
    serialization: RawSerialization,
    resources: Vec<RawResource>,
}

#[derive(Deserialize)]
struct RawSerialization {
    method: String,
    hash_type: String,
    allow_symlinks: bool,
    #[serde(default)]
    ignore_paths: Vec<String>,
    shard_size: Option<serde_json::Number>,
}

#[derive(Deserialize)]
struct RawResource {
    name: String,
    digest: String,
    algorithm: String,
}

fn bad(reason: impl Into<String>) -> OmsError {
    OmsError::Statement(reason.into())
}

fn short(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Reads a shard size written as an integer or, as the reference tool does
/// (protobuf Struct numbers are doubles), as an integral float like
/// `1000000000.0`.
fn shard_size(n: &serde_json::Number) -> Result<u64, OmsError> {
    let value = if let Some(v) = n.as_u64() {
        v
    } else {
        let f = n
            .as_f64()
            .ok_or_else(|| bad("shard_size is not a number"))?;
        // Integral, positive and exactly representable.
        if !((1.0..=9_007_199_254_740_992.0).contains(&f) && f.fract() == 0.0) {
            return Err(bad("shard_size is not a positive integer"));
        }
        f as u64
    };
    if value == 0 {
        return Err(bad("shard_size is zero"));
    }
    Ok(value)
}

/// Checks that a path is a normalised relative POSIX path.
fn check_path(name: &str) -> Result<(), OmsError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad("resource name empty or too long"));
    }
    if name.starts_with('/')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || name.contains('\0')
    {
        return Err(bad(format!(
            "resource name {:?} is not a normalised relative path",
            short(name)
        )));
    }
    Ok(())
}

impl Manifest {
    /// Parses the DSSE payload bytes (already authenticated).
    pub fn from_payload(payload: &[u8]) -> Result<Manifest, OmsError> {
        let raw: RawStatement = serde_json::from_slice(payload)
            .map_err(|e| bad(format!("not a model-signing statement: {e}")))?;
        if raw.type_ != STATEMENT_TYPE {
            return Err(bad(format!(
                "statement type {:?}, expected {STATEMENT_TYPE}",
                short(&raw.type_)
            )));
        }
        if raw.predicate_type != PREDICATE_TYPE {
            return Err(bad(format!(
                "predicate type {:?}, expected {PREDICATE_TYPE}",
                short(&raw.predicate_type)
            )));
        }
        let [subject] = <[RawSubject; 1]>::try_from(raw.subject)
            .map_err(|s| bad(format!("{} subjects, expected one", s.len())))?;
        let ser = raw.predicate.serialization;
        let hash_type = HashType::parse(&ser.hash_type)
            .ok_or_else(|| bad(format!("unsupported hash_type {:?}", short(&ser.hash_type))))?;
        let method = match (ser.method.as_str(), &ser.shard_size) {
            ("files", _) => Method::Files,
            ("shards", Some(n)) => Method::Shards {
                shard_size: shard_size(n)?,
            },
            ("shards", None) => return Err(bad("shards serialization without shard_size")),
            (other, _) => {
                return Err(bad(format!(
                    "unsupported serialization method {:?}",
                    short(other)
                )))
            }
        };
        if ser.ignore_paths.len() > MAX_IGNORE_PATHS
            || ser.ignore_paths.iter().any(|p| p.len() > MAX_NAME)
        {
            return Err(bad("too many or too long ignore_paths"));
        }
        let serialization = Serialization {
            method,
            hash_type,
            allow_symlinks: ser.allow_symlinks,
            ignore_paths: ser.ignore_paths,
        };
        let resources = raw.predicate.resources;
        if resources.len() > MAX_RESOURCES {
            return Err(OmsError::TooLarge {
                what: "resource list",
                found: resources.len() as u64,
                limit: MAX_RESOURCES as u64,
            });
        }
        let algorithm = serialization.algorithm();
        let mut hasher = Sha256::new();
        let mut map = BTreeMap::new();
        for r in resources {
            if r.algorithm != algorithm {
                return Err(bad(format!(
                    "resource {:?} has algorithm {:?}, expected {algorithm}",
                    short(&r.name),
                    short(&r.algorithm)
                )));
            }
            let digest = hex::decode(&r.digest)
                .ok()
                .filter(|d| d.len() == hash_type.digest_len())
                .ok_or_else(|| {
                    bad(format!(
                        "resource {:?} has a malformed digest",
                        short(&r.name)
                    ))
                })?;
            match &serialization.method {
                Method::Files => check_path(&r.name)?,
                Method::Shards { shard_size } => {
                    let (path, start, end) = split_shard(&r.name).ok_or_else(|| {
                        bad(format!(
                            "shard name {:?} is not path:start:end",
                            short(&r.name)
                        ))
                    })?;
                    check_path(path)?;
                    if start >= end || end - start > *shard_size || start % shard_size != 0 {
                        return Err(bad(format!(
                            "shard {:?} has invalid bounds",
                            short(&r.name)
                        )));
                    }
                }
            }
            hasher.update(&digest);
            if map.insert(r.name.clone(), digest).is_some() {
                return Err(bad(format!("resource {:?} listed twice", short(&r.name))));
            }
        }
        let digest = hasher.finalize();
        let expected =
            hex::decode(&subject.digest.sha256).map_err(|_| bad("subject digest is not hex"))?;
        if expected[..] != digest[..] {
            return Err(OmsError::SubjectDigest);
        }
        Ok(Manifest {
            model_name: subject.name,
            digest: hex::encode(digest),
            serialization,
            resources: map,
        })
    }
}

/// Splits `path:start:end` from the right, so paths may contain colons.
pub fn split_shard(name: &str) -> Option<(&str, u64, u64)> {
    let mut it = name.rsplitn(3, ':');
    let end = it.next()?;
    let start = it.next()?;
    let path = it.next()?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(start) || !digits(end) {
        return None;
    }
    Some((path, start.parse().ok()?, end.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(ser: &str, resources: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut h = Sha256::new();
        let res: Vec<String> = resources
            .iter()
            .map(|(n, a, d)| {
                h.update(hex::decode(d).unwrap());
                format!(r#"{{"name":"{n}","algorithm":"{a}","digest":"{d}"}}"#)
            })
            .collect();
        format!(
            r#"{{"_type":"{STATEMENT_TYPE}","subject":[{{"name":"m","digest":{{"sha256":"{}"}}}}],"predicateType":"{PREDICATE_TYPE}","predicate":{{"serialization":{ser},"resources":[{}]}}}}"#,
            hex::encode(h.finalize()),
            res.join(",")
        )
        .into_bytes()
    }

    const D: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn accepts_float_shard_size_and_colon_paths() {
        let p = statement(
            r#"{"method":"shards","hash_type":"sha256","allow_symlinks":false,"shard_size":1000000000.0}"#,
            &[("a:b:0:5", "sha256-sharded-1000000000", D)],
        );
        let m = Manifest::from_payload(&p).unwrap();
        assert_eq!(
            m.serialization.method,
            Method::Shards {
                shard_size: 1_000_000_000
            }
        );
        assert!(m.resources.contains_key("a:b:0:5"));
        assert_eq!(split_shard("a:b:0:5"), Some(("a:b", 0, 5)));
    }

    #[test]
    fn rejects_bad_shard_sizes() {
        for size in ["0", "1.5", "-3", "1e400", "\"1\""] {
            let p = statement(
                &format!(
                    r#"{{"method":"shards","hash_type":"sha256","allow_symlinks":false,"shard_size":{size}}}"#
                ),
                &[],
            );
            assert!(Manifest::from_payload(&p).is_err(), "{size}");
        }
    }

    #[test]
    fn rejects_duplicates_and_bad_names_and_wrong_subject() {
        let ser = r#"{"method":"files","hash_type":"sha256","allow_symlinks":false}"#;
        assert!(
            Manifest::from_payload(&statement(ser, &[("a", "sha256", D), ("a", "sha256", D)]))
                .is_err()
        );
        for name in ["/a", "a//b", "../a", "a/./b", ""] {
            assert!(
                Manifest::from_payload(&statement(ser, &[(name, "sha256", D)])).is_err(),
                "{name}"
            );
        }
        assert!(Manifest::from_payload(&statement(ser, &[("a", "blake3", D)])).is_err());
        let mut p = String::from_utf8(statement(ser, &[("a", "sha256", D)])).unwrap();
        p = p.replacen(r#""sha256":""#, r#""sha256":"00"#, 1);
        assert!(Manifest::from_payload(p.as_bytes()).is_err());
    }

    #[test]
    fn ignore_paths_match_components() {
        let s = Serialization {
            method: Method::Files,
            hash_type: HashType::Sha256,
            allow_symlinks: false,
            ignore_paths: vec![
                ".git".into(),
                "model.sig".into(),
                "../x".into(),
                "/etc".into(),
            ],
        };
        assert!(s.is_ignored(".git"));
        assert!(s.is_ignored(".git/config"));
        assert!(!s.is_ignored(".gitignore"));
        assert!(s.is_ignored("model.sig"));
        assert!(!s.is_ignored("x"));
        assert!(!s.is_ignored("etc"));
    }
}
