//! GPU and MIG device UUIDs as NVML and `CUDA_VISIBLE_DEVICES` write them,
//! and the one check of what CUDA shows against what was granted. The
//! worker (before it serves) and ccnode-scrub (before it scrubs) both ask
//! CUDA for device 0's UUID with `cuDeviceGetUuid_v2`, the call that
//! gives a MIG device its own UUID (`cuDeviceGetUuid`, v1, gives the
//! parent GPU's), and compare it here.

/// A device UUID's 16 bytes as 8-4-4-4-12 lower-case hex digits, without
/// the `GPU-`/`MIG-` prefix.
pub fn uuid_string(bytes: &[u8; 16]) -> String {
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether `shown` (a UUID as [`uuid_string`] writes it) is the granted
/// device `granted` (`GPU-…` or `MIG-…`, either case, or a bare UUID).
pub fn same_device(shown: &str, granted: &str) -> bool {
    let bare = ["GPU-", "MIG-"]
        .iter()
        .find_map(|p| {
            granted
                .get(..p.len())
                .filter(|head| head.eq_ignore_ascii_case(p))
                .map(|_| &granted[p.len()..])
        })
        .unwrap_or(granted);
    bare.eq_ignore_ascii_case(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: [u8; 16] = [
        0x8a, 0x1c, 0x2e, 0x44, 0x01, 0x02, 0x03, 0x04, 0xaa, 0xbb, 0, 1, 2, 3, 4, 5,
    ];
    const MIG: [u8; 16] = [
        0x5d, 0x3f, 0x10, 0x9e, 0x7a, 0x21, 0x5b, 0x4c, 0x80, 0x11, 0xfe, 0xdc, 0xba, 0x98, 0x76,
        0x54,
    ];

    #[test]
    fn uuids_are_written_as_nvml_writes_them() {
        assert_eq!(uuid_string(&GPU), "8a1c2e44-0102-0304-aabb-000102030405");
        assert_eq!(uuid_string(&MIG), "5d3f109e-7a21-5b4c-8011-fedcba987654");
    }

    #[test]
    fn a_grant_matches_its_own_device_only() {
        let (gpu, mig) = (uuid_string(&GPU), uuid_string(&MIG));
        // A whole GPU granted, CUDA shows that GPU.
        assert!(same_device(
            &gpu,
            "GPU-8a1c2e44-0102-0304-aabb-000102030405"
        ));
        assert!(same_device(
            &gpu,
            "gpu-8A1C2E44-0102-0304-AABB-000102030405"
        ));
        // A MIG device granted, CUDA shows that MIG device (what
        // cuDeviceGetUuid_v2 reports).
        assert!(same_device(
            &mig,
            "MIG-5d3f109e-7a21-5b4c-8011-fedcba987654"
        ));
        assert!(same_device(
            &mig,
            "MIG-5D3F109E-7A21-5B4C-8011-FEDCBA987654"
        ));
        // A MIG device granted, CUDA shows its parent GPU (what
        // cuDeviceGetUuid, v1, would report): not the device granted.
        assert!(!same_device(
            &gpu,
            "MIG-5d3f109e-7a21-5b4c-8011-fedcba987654"
        ));
        // Nor is any other device.
        assert!(!same_device(
            &mig,
            "GPU-8a1c2e44-0102-0304-aabb-000102030405"
        ));
        assert!(!same_device(
            &gpu,
            "GPU-8a1c2e44-0102-0304-aabb-000102030406"
        ));
        assert!(!same_device(&gpu, ""));
        assert!(!same_device(&gpu, "MIG-"));
    }
}
