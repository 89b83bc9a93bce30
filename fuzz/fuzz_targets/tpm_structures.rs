//! The verifier's TPM structure parsers, fed by an untrusted node:
//! `TPMS_ATTEST` (quote), `TPMT_SIGNATURE` and `TPMT_PUBLIC`
//! (`ccnode_attest::tpm::wire`), and the AK key built from a parsed public
//! area.
//!
//! The first input byte chooses the parser. Beyond "no panic", checks that
//! an accepted quote re-marshals its PCR selection within bounds, and that
//! an accepted public area has a name exactly when its name algorithm is
//! sha256.
#![no_main]

use ccnode_attest::tpm::key::AkPublicKey;
use ccnode_attest::tpm::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(q) = wire::parse_quote(rest) {
                assert!(q.extra_data.len() <= wire::MAX_DIGEST);
                assert!(q.pcr_select.len() <= wire::MAX_PCR_BANKS);
                let _ = wire::marshal_pcr_selection(&q.pcr_select);
            }
        }
        1 => {
            let _ = wire::parse_signature(rest);
        }
        _ => {
            if let Ok(area) = wire::parse_public(rest) {
                assert_eq!(
                    area.name(rest).is_some(),
                    area.name_alg == wire::TPM_ALG_SHA256
                );
                if let Ok(key) = AkPublicKey::from_public_area(&area) {
                    let _ = key.spki_der();
                }
            }
        }
    }
});
