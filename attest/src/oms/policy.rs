//! The node's trust policy: which public keys, CA roots and certificate
//! identities may sign which models. A model is verified only under an
//! entry that names it (or is global); a signature that verifies under no
//! applicable entry is refused.
//!
//! The trust configuration file (TOML):
//!
//! ```toml
//! [[signer]]
//! models = ["*"]                      # "*" = every model
//! public_keys = ["keys/publisher.pem"] # relative to this file
//!
//! [[signer]]
//! models = ["llama-3-8b"]
//! ca_roots = ["ca/root.pem"]
//! identities = ["email:release@example.com"] # email:/uri:/dns:/cn: or bare (any kind); empty = any
//! subject_is_model = true              # the statement must name the model verified
//!
//! [[signer]]
//! models = ["*"]
//! sigstore_trust_root = "sigstore/trusted_root.json" # Sigstore keyless
//! sigstore_identities = [
//!     { identity = "release@example.com", issuer = "https://accounts.google.com" },
//! ]
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use x509_cert::Certificate;

use super::bundle::{pae, Bundle, Material, IN_TOTO_PAYLOAD_TYPE};
use super::keys::{check_hint, PublicKey};
use super::sigstore::{self, Identity, TrustedRoot};
use super::{cert, read_bounded, OmsError, VerifyOptions};

/// Largest trust configuration, key or certificate file.
pub const MAX_TRUST_FILE: u64 = 1 << 20;
/// Most entries, keys or roots in a policy.
pub const MAX_TRUST_ITEMS: usize = 1024;

/// One policy entry.
#[derive(Debug, Clone, Default)]
pub struct PolicyEntry {
    /// Model ids this entry covers; `*` covers all.
    pub models: Vec<String>,
    pub public_keys: Vec<PublicKey>,
    pub ca_roots: Vec<Certificate>,
    /// Allowed certificate identities; empty allows any certificate that
    /// chains to `ca_roots`.
    pub identities: Vec<String>,
    /// Sigstore keyless: the trust root (Fulcio CAs, Rekor and CT logs)...
    pub sigstore_root: Option<TrustedRoot>,
    /// ...and the (SAN, OIDC issuer) pairs allowed to sign; never empty
    /// when `sigstore_root` is set.
    pub sigstore_identities: Vec<Identity>,
    /// The signed statement's subject name must be the id of the model
    /// being verified. Without it a signer trusted for two models can have
    /// one's signed directory served as the other.
    pub subject_is_model: bool,
}

impl PolicyEntry {
    fn covers(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// With `subject_is_model`, whether the verified `payload` names
    /// `model`; without, always.
    fn names_ok(&self, payload: &[u8], model: &str) -> Result<(), OmsError> {
        if !self.subject_is_model {
            return Ok(());
        }
        let name = super::manifest::subject_name(payload)?;
        if name == model {
            Ok(())
        } else {
            Err(OmsError::SubjectName {
                model: model.to_owned(),
                name,
            })
        }
    }
}

/// The set of entries.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    pub entries: Vec<PolicyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    signer: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    models: Vec<String>,
    #[serde(default)]
    public_keys: Vec<PathBuf>,
    #[serde(default)]
    ca_roots: Vec<PathBuf>,
    #[serde(default)]
    identities: Vec<String>,
    sigstore_trust_root: Option<PathBuf>,
    #[serde(default)]
    sigstore_identities: Vec<Identity>,
    #[serde(default)]
    subject_is_model: bool,
}

fn material(what: impl Into<String>, reason: impl Into<String>) -> OmsError {
    OmsError::TrustMaterial {
        what: what.into(),
        reason: reason.into(),
    }
}

/// Loads a PEM public key file.
pub fn load_public_key(path: &Path) -> Result<PublicKey, OmsError> {
    let bytes = read_bounded(path, "public key file", MAX_TRUST_FILE)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| material(path.display().to_string(), "not UTF-8 PEM"))?;
    PublicKey::from_pem(text).map_err(|e| material(path.display().to_string(), e))
}

/// Loads every certificate in a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<Certificate>, OmsError> {
    let bytes = read_bounded(path, "certificate file", MAX_TRUST_FILE)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| material(path.display().to_string(), "not UTF-8 PEM"))?;
    cert::parse_pem_bundle(text).map_err(|e| material(path.display().to_string(), e))
}

impl TrustPolicy {
    /// A policy trusting `key` for every model.
    pub fn global_key(key: PublicKey) -> TrustPolicy {
        TrustPolicy {
            entries: vec![PolicyEntry {
                models: vec!["*".into()],
                public_keys: vec![key],
                ..Default::default()
            }],
        }
    }

    /// A policy trusting certificates that chain to `roots` for every model.
    pub fn global_roots(roots: Vec<Certificate>) -> TrustPolicy {
        TrustPolicy {
            entries: vec![PolicyEntry {
                models: vec!["*".into()],
                ca_roots: roots,
                ..Default::default()
            }],
        }
    }

    /// A policy trusting keyless signatures under `root` by `identities`,
    /// for every model.
    pub fn global_sigstore(root: TrustedRoot, identities: Vec<Identity>) -> TrustPolicy {
        TrustPolicy {
            entries: vec![PolicyEntry {
                models: vec!["*".into()],
                sigstore_root: Some(root),
                sigstore_identities: identities,
                ..Default::default()
            }],
        }
    }

    /// Loads a trust configuration file; relative paths in it are relative
    /// to the file's directory.
    pub fn load(path: &Path) -> Result<TrustPolicy, OmsError> {
        let bytes = read_bounded(path, "trust configuration", MAX_TRUST_FILE)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| material(path.display().to_string(), "not UTF-8"))?;
        Self::parse(text, path.parent().unwrap_or(Path::new("."))).map_err(|e| match e {
            OmsError::TrustMaterial { what, reason } if what.is_empty() => {
                material(path.display().to_string(), reason)
            }
            e => e,
        })
    }

    /// Parses a trust configuration's text, resolving paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<TrustPolicy, OmsError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| material("", e.message().to_string()))?;
        if raw.signer.is_empty() {
            return Err(material("", "no [[signer]] entry"));
        }
        if raw.signer.len() > MAX_TRUST_ITEMS {
            return Err(material("", "too many [[signer]] entries"));
        }
        let mut entries = Vec::new();
        for (i, e) in raw.signer.into_iter().enumerate() {
            if e.models.is_empty() {
                return Err(material(
                    format!("signer[{i}].models"),
                    "empty: name models or \"*\"",
                ));
            }
            if e.public_keys.is_empty() && e.ca_roots.is_empty() && e.sigstore_trust_root.is_none()
            {
                return Err(material(
                    format!("signer[{i}]"),
                    "none of public_keys, ca_roots, sigstore_trust_root",
                ));
            }
            // Keyless without identities would trust anyone with an account
            // at any OIDC provider the CA accepts.
            if e.sigstore_trust_root.is_some() == e.sigstore_identities.is_empty() {
                return Err(material(
                    format!("signer[{i}]"),
                    "sigstore_trust_root and sigstore_identities go together",
                ));
            }
            if e.sigstore_identities.len() > MAX_TRUST_ITEMS
                || e.sigstore_identities
                    .iter()
                    .any(|id| id.identity.is_empty() || id.issuer.is_empty())
            {
                return Err(material(
                    format!("signer[{i}].sigstore_identities"),
                    "each needs a non-empty identity and issuer",
                ));
            }
            let sigstore_root = e
                .sigstore_trust_root
                .as_ref()
                .map(|p| TrustedRoot::load(&base.join(p)))
                .transpose()?;
            if e.public_keys.len() + e.ca_roots.len() > MAX_TRUST_ITEMS {
                return Err(material(format!("signer[{i}]"), "too many keys or roots"));
            }
            let public_keys = e
                .public_keys
                .iter()
                .map(|p| load_public_key(&base.join(p)))
                .collect::<Result<_, _>>()?;
            let mut ca_roots = Vec::new();
            for p in &e.ca_roots {
                ca_roots.extend(load_certificates(&base.join(p))?);
            }
            entries.push(PolicyEntry {
                models: e.models,
                public_keys,
                ca_roots,
                identities: e.identities,
                sigstore_root,
                sigstore_identities: e.sigstore_identities,
                subject_is_model: e.subject_is_model,
            });
        }
        Ok(TrustPolicy { entries })
    }

    /// Checks the bundle's signature under the entries covering the model;
    /// returns a description of the signer.
    pub fn verify_bundle(
        &self,
        bundle: &Bundle,
        options: &VerifyOptions,
    ) -> Result<String, OmsError> {
        if bundle.payload_type != IN_TOTO_PAYLOAD_TYPE {
            return Err(OmsError::Bundle(format!(
                "payload type {:?}, expected {IN_TOTO_PAYLOAD_TYPE}",
                bundle.payload_type.chars().take(80).collect::<String>()
            )));
        }
        let message = pae(&bundle.payload_type, &bundle.payload);
        let model = &options.model_id;
        let applicable: Vec<&PolicyEntry> =
            self.entries.iter().filter(|e| e.covers(model)).collect();
        match &bundle.material {
            Material::PublicKey { hint } => {
                let signer = format!("key {}", hint.as_deref().unwrap_or("(no hint)"));
                let keys: Vec<&PublicKey> = applicable
                    .iter()
                    .flat_map(|e| e.public_keys.iter())
                    .collect();
                let all: Vec<&PublicKey> = self
                    .entries
                    .iter()
                    .flat_map(|e| e.public_keys.iter())
                    .collect();
                if keys.is_empty() {
                    return Err(OmsError::Untrusted {
                        model: model.clone(),
                        signer,
                    });
                }
                let candidates: Vec<&PublicKey> = keys
                    .iter()
                    .copied()
                    .filter(|k| check_hint(k, hint.as_deref()).is_ok())
                    .collect();
                if candidates.is_empty() {
                    // Named a key: one trusted for another model, or an unknown one.
                    if all.iter().any(|k| check_hint(k, hint.as_deref()).is_ok()) {
                        return Err(OmsError::Untrusted {
                            model: model.clone(),
                            signer,
                        });
                    }
                    return check_hint(keys[0], hint.as_deref()).map(|_| signer);
                }
                // Entries are alternatives: the signature must verify under
                // a key of one of them, and the statement satisfy that one.
                let mut refused = None;
                for entry in &applicable {
                    let verifies = entry
                        .public_keys
                        .iter()
                        .filter(|k| candidates.iter().any(|c| std::ptr::eq(*c, *k)))
                        .any(|k| k.verify(&message, &bundle.signature));
                    if verifies {
                        match entry.names_ok(&bundle.payload, model) {
                            Ok(()) => return Ok(signer),
                            Err(e) => refused = Some(e),
                        }
                    }
                }
                Err(refused.unwrap_or(OmsError::BadSignature))
            }
            Material::CertificateChain(chain) => {
                let with_roots: Vec<&&PolicyEntry> = applicable
                    .iter()
                    .filter(|e| !e.ca_roots.is_empty())
                    .collect();
                if with_roots.is_empty() {
                    return Err(OmsError::Untrusted {
                        model: model.clone(),
                        signer: "certificate".into(),
                    });
                }
                let mut last = None;
                for entry in with_roots {
                    match cert::verify_chain(chain, &entry.ca_roots, options.now) {
                        Ok(signing) => {
                            let signer = format!("certificate {}", signing.subject);
                            if !entry.identities.is_empty()
                                && !entry.identities.iter().any(|id| signing.has_identity(id))
                            {
                                last = Some(OmsError::Untrusted {
                                    model: model.clone(),
                                    signer,
                                });
                                continue;
                            }
                            if signing.key.verify(&message, &bundle.signature) {
                                match entry.names_ok(&bundle.payload, model) {
                                    Ok(()) => return Ok(signer),
                                    Err(e) => last = Some(e),
                                }
                                continue;
                            }
                            last = Some(OmsError::BadSignature);
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or(OmsError::BadSignature))
            }
            Material::Keyless {
                certificate,
                entries,
                timestamps,
            } => {
                let with_root: Vec<(&PolicyEntry, &TrustedRoot, &[Identity])> = applicable
                    .iter()
                    .filter_map(|e| {
                        e.sigstore_root
                            .as_ref()
                            .map(|r| (*e, r, &e.sigstore_identities[..]))
                    })
                    .collect();
                if with_root.is_empty() {
                    return Err(OmsError::Untrusted {
                        model: model.clone(),
                        signer: "sigstore keyless".into(),
                    });
                }
                let mut last = None;
                for (entry, root, allowed) in with_root {
                    match sigstore::verify(bundle, certificate, entries, timestamps, root, &message)
                    {
                        Ok(who) => {
                            let mut signer = format!(
                                "sigstore {} ({}), {} entry {}",
                                who.identities.join(", "),
                                who.issuer,
                                who.log_url,
                                who.log_index
                            );
                            for t in &who.timestamps {
                                let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(*t);
                                signer.push_str(&format!(
                                    ", timestamped {}",
                                    humantime::format_rfc3339_seconds(at)
                                ));
                            }
                            if allowed.iter().any(|a| {
                                a.issuer == who.issuer && who.identities.contains(&a.identity)
                            }) {
                                match entry.names_ok(&bundle.payload, model) {
                                    Ok(()) => return Ok(signer),
                                    Err(e) => {
                                        last = Some(e);
                                        continue;
                                    }
                                }
                            }
                            last = Some(OmsError::Untrusted {
                                model: model.clone(),
                                signer,
                            });
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or(OmsError::BadSignature))
            }
        }
    }
}
