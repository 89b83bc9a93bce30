//! The OMS signature file: `ccnode_attest::oms::bundle::Bundle::parse`, and
//! the signed statement inside it, `oms::manifest::Manifest::from_payload`.
//! Both parse untrusted bytes (the statement only after its signature
//! verified, but a publisher's key is not a reason to trust its parser).
//!
//! Beyond "no panic", checks that parse errors are the parser's own
//! variants, and that an accepted manifest keeps its bounds: digests of the
//! signed length, names within the limit, a 64-hex-digit manifest digest.
#![no_main]

use ccnode_attest::oms::bundle::{Bundle, MAX_SIGNATURE_FILE};
use ccnode_attest::oms::manifest::{Manifest, MAX_NAME};
use ccnode_attest::oms::OmsError;
use libfuzzer_sys::fuzz_target;

fn check_manifest(bytes: &[u8]) {
    match Manifest::from_payload(bytes) {
        Ok(m) => {
            assert_eq!(m.digest.len(), 64);
            for (name, digest) in &m.resources {
                assert!(name.len() <= MAX_NAME + 42, "{name}");
                assert_eq!(digest.len(), m.serialization.hash_type.digest_len());
            }
        }
        Err(e) => assert!(
            matches!(
                e,
                OmsError::Statement(_) | OmsError::SubjectDigest | OmsError::TooLarge { .. }
            ),
            "{e:?}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    match Bundle::parse(data) {
        Ok(bundle) => {
            assert!(data.len() as u64 <= MAX_SIGNATURE_FILE);
            assert!(!bundle.signature.is_empty());
            check_manifest(&bundle.payload);
        }
        Err(e) => assert!(
            matches!(e, OmsError::Bundle(_) | OmsError::TooLarge { .. }),
            "{e:?}"
        ),
    }
    check_manifest(data);
});
