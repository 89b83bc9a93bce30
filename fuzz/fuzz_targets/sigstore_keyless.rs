//! Sigstore keyless verification: `oms::sigstore::TrustedRoot::parse` and
//! `TrustedRoot::verify_timestamp` (RFC 3161) on arbitrary bytes, and
//! `oms::sigstore::verify` on any bundle that parses as keyless, against the production trust root (the test fixture). The
//! second reaches the parsers of the log entry (Rekor v1 `dsse` and v2
//! `hashedrekord`, seed-rekor-v2-shape naming the production v2 shard with
//! its genuine checkpoint), the checkpoint, the certificate's SCT list and
//! its identity extensions with attacker bytes.
//!
//! Beyond "no panic": whatever verifies carries exactly the genuine fixture's
//! payload, signature and certificate (the seed verifies, and so may
//! re-encodings of its JSON; nothing else can, without Rekor's and Fulcio's
//! keys), and every refusal is one of the keyless path's own error variants.
#![no_main]

use std::sync::OnceLock;

use ccnode_attest::oms::bundle::{pae, Bundle, Material};
use ccnode_attest::oms::sigstore::{self, TrustedRoot};
use ccnode_attest::oms::OmsError;
use libfuzzer_sys::fuzz_target;

const GENUINE: &[u8] = include_bytes!("../../attest/tests/fixtures/sigstore/v1.1.0-sigstore.sig");

fn production() -> &'static TrustedRoot {
    static ROOT: OnceLock<TrustedRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        TrustedRoot::parse(include_bytes!(
            "../../attest/tests/fixtures/sigstore/production-trusted_root.json"
        ))
        .expect("the fixture parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = TrustedRoot::parse(data);
    // The RFC 3161 reader, on the raw bytes as a timestamp response.
    let _ = production().verify_timestamp(data, b"signature");
    let Ok(bundle) = Bundle::parse(data) else {
        return;
    };
    let Material::Keyless {
        certificate,
        entries,
        timestamps,
    } = &bundle.material
    else {
        return;
    };
    let message = pae(&bundle.payload_type, &bundle.payload);
    match sigstore::verify(
        &bundle,
        certificate,
        entries,
        timestamps,
        production(),
        &message,
    ) {
        Ok(who) => {
            let genuine = Bundle::parse(GENUINE).expect("the fixture parses");
            let Material::Keyless {
                certificate: genuine_cert,
                ..
            } = &genuine.material
            else {
                unreachable!("the fixture is keyless")
            };
            assert!(
                bundle.payload == genuine.payload
                    && bundle.payload_type == genuine.payload_type
                    && bundle.signature == genuine.signature
                    && certificate == genuine_cert,
                "a signature other than the genuine one verified: {who:?}"
            );
        }
        Err(e) => assert!(
            matches!(
                e,
                OmsError::TransparencyLog(_)
                    | OmsError::Timestamp(_)
                    | OmsError::Certificate(_)
                    | OmsError::BadSignature
            ),
            "{e:?}"
        ),
    }
});
