//! The Merkle tree of batched nonces (RFC 9162, section 2.1, with SHA-256).
//!
//! When several verifiers ask at once, ccnoded answers them with one quote
//! whose binding covers the root of a tree of their nonces; each answer
//! carries its verifier's leaf index and audit path, so each verifier checks
//! that its own nonce is in the quoted root. Leaves and interior nodes are
//! hashed with different prefixes (0x00, 0x01), so no interior node can pass
//! for a leaf, and the leaf hash covers the whole nonce, length included.

use sha2::{Digest, Sha256};

/// Most nonces in one batch.
pub const MAX_BATCH: usize = 4096;
/// Longest audit path accepted (ceil(log2(MAX_BATCH))).
pub const MAX_PATH: usize = 12;

/// The hash of a leaf: sha256(0x00 || u32be(len) || nonce).
pub fn leaf_hash(nonce: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.finalize().into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The root of `leaves` (already leaf-hashed), MTH in RFC 9162. `None` for
/// no leaves.
pub fn root(leaves: &[[u8; 32]]) -> Option<[u8; 32]> {
    match leaves.len() {
        0 => None,
        1 => Some(leaves[0]),
        n => {
            let k = split(n);
            Some(node_hash(&root(&leaves[..k])?, &root(&leaves[k..])?))
        }
    }
}

/// The audit path of leaf `index` (PATH in RFC 9162), leaf side first.
pub fn path(leaves: &[[u8; 32]], index: usize) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = path(&leaves[..k], index);
        p.extend(root(&leaves[k..]));
        p
    } else {
        let mut p = path(&leaves[k..], index - k);
        p.extend(root(&leaves[..k]));
        p
    }
}

/// The root that `leaf` at `index` of a tree of `size` leaves has with
/// `path` (RFC 9162, 2.1.3.2); `None` when the path cannot belong to such a
/// tree.
pub fn root_from_path(
    leaf: &[u8; 32],
    index: u64,
    size: u64,
    path: &[[u8; 32]],
) -> Option<[u8; 32]> {
    if path.len() > MAX_PATH {
        return None;
    }
    root_from_audit_path(leaf, index, size, path)
}

/// [`root_from_path`] for trees of any size (a transparency log's): the
/// path is bounded only by the 64 levels a `u64` size allows.
pub fn root_from_audit_path(
    leaf: &[u8; 32],
    index: u64,
    size: u64,
    path: &[[u8; 32]],
) -> Option<[u8; 32]> {
    if index >= size || path.len() > 64 {
        return None;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if sn == 0 {
            return None;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| leaf_hash(format!("nonce-{i:04}-padding!").as_bytes()))
            .collect()
    }

    #[test]
    fn every_leaf_of_every_size_proves_its_inclusion() {
        for n in 1..=33 {
            let l = leaves(n);
            let r = root(&l).unwrap();
            for i in 0..n {
                let p = path(&l, i);
                assert!(p.len() <= MAX_PATH);
                assert_eq!(
                    root_from_path(&l[i], i as u64, n as u64, &p),
                    Some(r),
                    "leaf {i} of {n}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_leaf_index_size_or_path_gives_another_root_or_none() {
        let l = leaves(7);
        let r = root(&l).unwrap();
        let p = path(&l, 3);
        assert_ne!(root_from_path(&l[4], 3, 7, &p), Some(r), "other leaf");
        assert_ne!(root_from_path(&l[3], 2, 7, &p), Some(r), "other index");
        // The size only matters where it changes the path's shape: a leaf
        // in a full left subtree has the same path in trees of 7 and 8.
        let last = path(&l, 6);
        assert_eq!(root_from_path(&l[6], 6, 7, &last), Some(r));
        assert_ne!(root_from_path(&l[6], 6, 8, &last), Some(r), "other size");
        assert_eq!(root_from_path(&l[3], 7, 7, &p), None, "index past size");
        let mut bad = p.clone();
        bad[0][0] ^= 1;
        assert_ne!(root_from_path(&l[3], 3, 7, &bad), Some(r));
        assert_eq!(
            root_from_path(&l[3], 3, 7, &p[..p.len() - 1]),
            None,
            "short"
        );
        let mut long = p.clone();
        long.push([0; 32]);
        assert_eq!(root_from_path(&l[3], 3, 7, &long), None, "long");
        // An interior node is not a leaf: the root of two leaves, offered
        // as a leaf of a one-leaf tree, is not their root's leaf hash.
        assert_ne!(leaf_hash(&r), r);
    }

    #[test]
    fn the_root_matches_rfc_9162_shape() {
        // Three leaves: MTH = H(1 || H(1 || l0 || l1) || l2).
        let l = leaves(3);
        assert_eq!(
            root(&l).unwrap(),
            node_hash(&node_hash(&l[0], &l[1]), &l[2])
        );
        assert_eq!(root(&[]), None);
        assert_eq!(root(&l[..1]).unwrap(), l[0]);
    }
}
