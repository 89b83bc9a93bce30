//! AMD SEV-SNP inputs from an untrusted node: the attestation report
//! (`ccnode_attest::tee::snp::parse_report`, and the file form
//! `report_from_file_bytes`), the host's certificate table
//! (`parse_cert_table`) and the `sev-snp` evidence document
//! (`verify_evidence`, offline: no cert_dir, so only the table is used).
//!
//! The first input byte chooses the parser. Beyond "no panic", checks that
//! a parsed report keeps its bytes and decodes its TCBs for every
//! generation, and that every accepted table entry lies inside the buffer,
//! after the entries, and survives a rebuild.
#![no_main]

use std::time::{Duration, SystemTime};

use ccnode_attest::tee::snp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(r) = snp::parse_report(rest) {
                assert_eq!(r.raw(), rest);
                assert_eq!(r.signed_bytes().len(), snp::SIGNED_LEN);
                assert!(matches!(r.version, 2 | 3 | 5));
                for g in snp::Generation::ALL {
                    let _ = r.for_generation(g);
                }
                let _ = r.to_json();
            }
        }
        1 => {
            let _ = snp::report_from_file_bytes(rest);
        }
        2 => {
            if let Ok(t) = snp::parse_cert_table(rest) {
                assert!(t.entries.len() <= snp::MAX_CERT_ENTRIES);
                let table_end = (t.entries.len() + 1) * 24;
                for e in &t.entries {
                    assert!(!e.data.is_empty());
                    assert!(e.data.len() + table_end <= rest.len());
                }
                let rebuilt: Vec<([u8; 16], &[u8])> = t
                    .entries
                    .iter()
                    .map(|e| (e.guid, e.data.as_slice()))
                    .collect();
                let back = snp::parse_cert_table(&snp::build_cert_table(&rebuilt))
                    .expect("a rebuilt table parses");
                assert_eq!(back, t);
            }
        }
        _ => {
            // A report and a table split at the first 1184 bytes.
            let (report, table) = rest.split_at(rest.len().min(snp::REPORT_LEN));
            let ev = snp::SnpEvidence::new(report, (!table.is_empty()).then_some(table));
            let ev = serde_json::to_value(ev).expect("evidence serialises");
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200);
            let _ = snp::verify_evidence(&ev, &[0; 32], &snp::SnpPolicy::default(), now);
        }
    }
});
