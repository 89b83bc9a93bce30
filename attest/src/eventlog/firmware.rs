//! The firmware's TPM event log in the TCG PC Client crypto-agile format
//! (TCG PC Client Platform Firmware Profile, section 10): a `TCG_PCR_EVENT`
//! header in the SHA-1 layout whose data is the `TCG_EfiSpecIDEvent`
//! ("Spec ID Event03") listing the banks and their digest sizes, then
//! `TCG_PCR_EVENT2` entries, each with one digest per bank.
//!
//! [`replay`] parses the log (bounded: size, event count, digests per event,
//! event size; never panics) and replays the sha256 bank from zeros.
//! `EV_NO_ACTION` events are not extended; a `StartupLocality` event sets
//! PCR 0's initial value to the locality, as the specification says: once,
//! 17 bytes, before anything is measured into PCR 0 (a later one would
//! drop the events before it from the replay, so the log could show any).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::ccnode::extend;

/// Largest firmware log accepted (real ones are tens of KiB).
pub const MAX_LOG: usize = 4 << 20;
/// Most events accepted.
pub const MAX_EVENTS: usize = 100_000;
/// Most digests in one event (`HASH_COUNT` in practice is 5).
pub const MAX_DIGESTS: u32 = 8;
/// Largest event data of one event.
pub const MAX_EVENT_DATA: u32 = 1 << 20;

pub const EV_NO_ACTION: u32 = 0x0000_0003;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";
const ALG_SHA256: u16 = 0x000b;

/// A parse failure, with the byte offset where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("firmware event log at byte {offset}: {reason}")]
pub struct FirmwareLogError {
    pub offset: usize,
    pub reason: String,
}

/// The result of replaying the log's sha256 bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareReplay {
    /// PCR index → replayed sha256 value, for every PCR the log extends.
    pub pcrs: BTreeMap<u32, [u8; 32]>,
    /// Events parsed (header included).
    pub events: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl Into<String>) -> FirmwareLogError {
        FirmwareLogError {
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], FirmwareLogError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err(format!("truncated {field}")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, f: &str) -> Result<u8, FirmwareLogError> {
        Ok(self.take(1, f)?[0])
    }

    fn u16(&mut self, f: &str) -> Result<u16, FirmwareLogError> {
        let b = self.take(2, f)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, f: &str) -> Result<u32, FirmwareLogError> {
        let b = self.take(4, f)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// Parses the log and replays its sha256 bank.
pub fn replay(log: &[u8]) -> Result<FirmwareReplay, FirmwareLogError> {
    if log.len() > MAX_LOG {
        return Err(FirmwareLogError {
            offset: 0,
            reason: format!("{} bytes exceed the limit of {MAX_LOG}", log.len()),
        });
    }
    let mut c = Cursor { buf: log, pos: 0 };

    // TCG_PCR_EVENT header (SHA-1 layout).
    let _pcr = c.u32("header pcrIndex")?;
    let ty = c.u32("header eventType")?;
    if ty != EV_NO_ACTION {
        return Err(c.err(format!(
            "first event type {ty:#x} is not EV_NO_ACTION: not a crypto-agile log"
        )));
    }
    c.take(20, "header digest")?;
    let size = c.u32("header eventSize")?;
    if size > MAX_EVENT_DATA {
        return Err(c.err(format!("header event of {size} bytes")));
    }
    let spec = c.take(size as usize, "header event")?;
    let sizes = parse_spec_id(spec).map_err(|r| FirmwareLogError {
        offset: c.pos,
        reason: r,
    })?;
    if !sizes.contains_key(&ALG_SHA256) {
        return Err(c.err("the log has no sha256 bank"));
    }

    let mut pcrs: BTreeMap<u32, [u8; 32]> = BTreeMap::new();
    let mut events = 1usize;
    while !c.done() {
        if events >= MAX_EVENTS {
            return Err(c.err(format!("more than {MAX_EVENTS} events")));
        }
        let pcr = c.u32("pcrIndex")?;
        if pcr >= 24 {
            return Err(c.err(format!("pcr index {pcr}")));
        }
        let ty = c.u32("eventType")?;
        let count = c.u32("digest count")?;
        if count > MAX_DIGESTS {
            return Err(c.err(format!("{count} digests in one event")));
        }
        let mut sha256 = None;
        for _ in 0..count {
            let alg = c.u16("digest algorithm")?;
            let len = *sizes
                .get(&alg)
                .ok_or_else(|| c.err(format!("digest algorithm {alg:#06x} not in the header")))?;
            let d = c.take(usize::from(len), "digest")?;
            if alg == ALG_SHA256 {
                sha256 = <[u8; 32]>::try_from(d).ok();
            }
        }
        let size = c.u32("eventSize")?;
        if size > MAX_EVENT_DATA {
            return Err(c.err(format!("event of {size} bytes")));
        }
        let data = c.take(size as usize, "event data")?;
        events += 1;
        if ty == EV_NO_ACTION {
            if pcr == 0 && data.len() >= 16 && data[..16] == STARTUP_LOCALITY_SIGNATURE[..] {
                // It sets PCR0's starting value, so it comes once, before
                // anything is measured into PCR0: a later one would let
                // the log show any events before it, which the replay
                // would then drop.
                if data.len() != 17 {
                    return Err(c.err(format!(
                        "StartupLocality event of {} bytes, not 17",
                        data.len()
                    )));
                }
                if pcrs.contains_key(&0) {
                    return Err(
                        c.err("StartupLocality event after PCR0 was measured or set already")
                    );
                }
                let mut init = [0u8; 32];
                init[31] = data[16];
                pcrs.insert(0, init);
            }
            continue;
        }
        let digest = sha256.ok_or_else(|| c.err("event without a sha256 digest"))?;
        let cur = pcrs.entry(pcr).or_insert([0u8; 32]);
        *cur = extend(cur, &digest);
    }
    Ok(FirmwareReplay { pcrs, events })
}

/// Parses `TCG_EfiSpecIDEvent`: algorithm id → digest size.
fn parse_spec_id(data: &[u8]) -> Result<BTreeMap<u16, u16>, String> {
    let mut c = Cursor { buf: data, pos: 0 };
    let map = |e: FirmwareLogError| format!("Spec ID event: {}", e.reason);
    let sig = c.take(16, "signature").map_err(map)?;
    if sig != SPEC_ID_SIGNATURE {
        return Err("header is not a \"Spec ID Event03\" event: not a crypto-agile log".into());
    }
    c.u32("platformClass").map_err(map)?;
    c.u8("specVersionMinor").map_err(map)?;
    let major = c.u8("specVersionMajor").map_err(map)?;
    if major != 2 {
        return Err(format!(
            "Spec ID event: spec version major {major} is not 2"
        ));
    }
    c.u8("specErrata").map_err(map)?;
    c.u8("uintnSize").map_err(map)?;
    let n = c.u32("numberOfAlgorithms").map_err(map)?;
    if n == 0 || n > MAX_DIGESTS {
        return Err(format!("Spec ID event: {n} algorithms"));
    }
    let mut sizes = BTreeMap::new();
    for _ in 0..n {
        let alg = c.u16("algorithmId").map_err(map)?;
        let size = c.u16("digestSize").map_err(map)?;
        if size == 0 || size > 64 {
            return Err(format!("Spec ID event: digest size {size}"));
        }
        if alg == ALG_SHA256 && size != 32 {
            return Err(format!("Spec ID event: sha256 digest size {size}"));
        }
        sizes.insert(alg, size);
    }
    let vendor = c.u8("vendorInfoSize").map_err(map)?;
    c.take(usize::from(vendor), "vendorInfo").map_err(map)?;
    Ok(sizes)
}

/// Builds a crypto-agile log (for tests and fuzz seeds): a header listing
/// sha1 and sha256, then `(pcr, type, data)` events whose digests are the
/// hashes of their data.
pub fn build_log(events: &[(u32, u32, &[u8])]) -> Vec<u8> {
    let mut spec = SPEC_ID_SIGNATURE.to_vec();
    spec.extend_from_slice(&0u32.to_le_bytes());
    spec.extend_from_slice(&[0, 2, 0, 2]);
    spec.extend_from_slice(&2u32.to_le_bytes());
    spec.extend_from_slice(&0x0004u16.to_le_bytes());
    spec.extend_from_slice(&20u16.to_le_bytes());
    spec.extend_from_slice(&ALG_SHA256.to_le_bytes());
    spec.extend_from_slice(&32u16.to_le_bytes());
    spec.push(0);
    let mut out = 0u32.to_le_bytes().to_vec();
    out.extend_from_slice(&EV_NO_ACTION.to_le_bytes());
    out.extend_from_slice(&[0u8; 20]);
    out.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    out.extend_from_slice(&spec);
    for (pcr, ty, data) in events {
        out.extend_from_slice(&pcr.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&0x0004u16.to_le_bytes());
        out.extend_from_slice(&[0x11; 20]);
        out.extend_from_slice(&ALG_SHA256.to_le_bytes());
        out.extend_from_slice(&Sha256::digest(data));
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_constructed_log() {
        let mut locality = STARTUP_LOCALITY_SIGNATURE.to_vec();
        locality.push(3);
        let log = build_log(&[
            (0, EV_NO_ACTION, &locality),
            (0, 0x8000_0008, b"crtm"),
            (7, 0x8000_00e0, b"secure boot"),
            (0, 0x0000_0004, b"separator"),
            (5, EV_NO_ACTION, b"not extended"),
        ]);
        let r = replay(&log).unwrap();
        assert_eq!(r.events, 6);
        let mut p0 = [0u8; 32];
        p0[31] = 3;
        p0 = extend(&p0, &Sha256::digest(b"crtm").into());
        p0 = extend(&p0, &Sha256::digest(b"separator").into());
        assert_eq!(r.pcrs[&0], p0);
        assert_eq!(
            r.pcrs[&7],
            extend(&[0; 32], &Sha256::digest(b"secure boot").into())
        );
        assert!(!r.pcrs.contains_key(&5));
    }

    #[test]
    fn truncations_and_garbage_fail_cleanly() {
        let log = build_log(&[(0, 1, b"a"), (1, 2, b"bb")]);
        for n in 0..log.len() {
            if let Ok(r) = replay(&log[..n]) {
                // Only whole-event prefixes parse.
                assert!(r.events <= 3, "prefix {n}");
            }
        }
        assert!(replay(&log[..log.len() - 1]).is_err());
        let mut bad = log.clone();
        bad[4] = 1; // header type not EV_NO_ACTION
        assert!(replay(&bad).unwrap_err().reason.contains("crypto-agile"));
        let mut bad = log.clone();
        bad[32] ^= 0xff; // Spec ID signature
        assert!(replay(&bad).is_err());
        assert!(replay(&vec![0u8; MAX_LOG + 1]).is_err());
        // A huge event size.
        let mut bad = build_log(&[]);
        bad.extend_from_slice(&0u32.to_le_bytes());
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&0u32.to_le_bytes());
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(replay(&bad).is_err());
        // Too many digests.
        let mut bad = build_log(&[]);
        bad.extend_from_slice(&0u32.to_le_bytes());
        bad.extend_from_slice(&1u32.to_le_bytes());
        bad.extend_from_slice(&1000u32.to_le_bytes());
        assert!(replay(&bad).unwrap_err().reason.contains("digests"));
    }

    #[test]
    fn startup_locality_comes_once_before_pcr0_is_measured() {
        let mut locality = STARTUP_LOCALITY_SIGNATURE.to_vec();
        locality.push(3);
        // After a PCR0 measurement it would drop that measurement (and any
        // fake ones before it) from the replay.
        let late = build_log(&[
            (0, 0x8000_0008, b"shown, not replayed"),
            (0, EV_NO_ACTION, &locality),
        ]);
        let e = replay(&late).unwrap_err().reason;
        assert!(e.contains("after PCR0"), "{e}");
        let twice = build_log(&[(0, EV_NO_ACTION, &locality), (0, EV_NO_ACTION, &locality)]);
        assert!(replay(&twice).unwrap_err().reason.contains("after PCR0"));
        let mut long = locality.clone();
        long.push(0);
        let e = replay(&build_log(&[(0, EV_NO_ACTION, &long)]))
            .unwrap_err()
            .reason;
        assert!(e.contains("not 17"), "{e}");
        // A measurement in another PCR first is fine.
        let other = build_log(&[(7, 0x8000_00e0, b"sb"), (0, EV_NO_ACTION, &locality)]);
        let r = replay(&other).unwrap();
        assert_eq!(r.pcrs[&0][31], 3);
    }
}
