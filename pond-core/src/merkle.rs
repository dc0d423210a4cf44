//! The transparency log's Merkle tree, as RFC 6962 / RFC 9162 define it: leaf hash
//! `SHA-256(0x00 ‖ leaf)`, node hash `SHA-256(0x01 ‖ left ‖ right)`, the tree of `n` leaves split
//! at the largest power of two below `n`. Audit (inclusion) and consistency proofs are computed
//! from the leaf hashes and checked with the RFC's verification algorithms, so any RFC 9162
//! client checks them too. Signed tree heads bind a size and a root to a control-plane key.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// What a tree head signature signs before its fields (domain separation).
pub const TREE_HEAD_CONTEXT: &[u8] = b"pond.treehead.v1\0";

/// The hash of a leaf's bytes.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (`n` ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The root of the tree over `leaves` (leaf hashes); the empty tree's root is SHA-256 of nothing.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index` in the tree over `leaves` (RFC 9162 §2.1.3.1), or `None`
/// when the index is outside the tree.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    (index < leaves.len()).then(|| path(index, leaves))
}

fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut p = path(m, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = path(m - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// The consistency proof between the tree of the first `old_size` leaves and the tree over all
/// of `leaves` (RFC 9162 §2.1.4.1), or `None` when `old_size` is 0 or larger than the tree.
pub fn consistency_proof(leaves: &[Hash], old_size: usize) -> Option<Vec<Hash>> {
    (old_size > 0 && old_size <= leaves.len()).then(|| subproof(old_size, leaves, true))
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete { Vec::new() } else { vec![root(leaves)] };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], complete);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Checks an audit path (RFC 9162 §2.1.3.2): leaf `index` with hash `leaf` is in the tree of
/// `size` leaves whose root is `root`.
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2): the tree of `old_size` leaves with root
/// `old_root` is a prefix of the tree of `new_size` leaves with root `new_root`.
pub fn verify_consistency(old_size: u64, new_size: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    // When the old tree is a complete subtree (a power of two), its root starts the path.
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let Some((first, rest)) = path.split_first() else { return false };
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *old_root && sr == *new_root
}

/// A log's tree kept in memory: every perfect subtree's hash, level by level, so the root of
/// any prefix and its proofs take O(log² n) hashes instead of rehashing the log. Appending a
/// leaf costs O(1) amortized. The results equal [`root`], [`inclusion_proof`] and
/// [`consistency_proof`] over the same leaves.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    /// `levels[k][i]`: the hash of leaves `i·2^k .. (i+1)·2^k`.
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// Leaves in the tree.
    pub fn len(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// Whether it has no leaf.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut level = 0;
        while self.levels[level].len() % 2 == 0 {
            let n = self.levels[level].len();
            let parent = node_hash(&self.levels[level][n - 2], &self.levels[level][n - 1]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
        }
    }

    /// The hash of the tree over leaves `lo..hi` (RFC 9162's MTH), `lo` aligned as the RFC's
    /// recursion aligns it.
    fn mth(&self, lo: usize, hi: usize) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return Sha256::digest([]).into();
        }
        if n.is_power_of_two() && lo % n == 0 {
            return self.levels[n.trailing_zeros() as usize][lo / n];
        }
        let k = split(n);
        node_hash(&self.mth(lo, lo + k), &self.mth(lo + k, hi))
    }

    /// The root of the tree of the first `size` leaves (`size` at most [`Tree::len`]).
    pub fn root(&self, size: usize) -> Hash {
        self.mth(0, size.min(self.len()))
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, index: usize, size: usize) -> Option<Vec<Hash>> {
        (index < size && size <= self.len()).then(|| self.path(index, 0, size))
    }

    fn path(&self, m: usize, lo: usize, hi: usize) -> Vec<Hash> {
        let n = hi - lo;
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        if m < k {
            let mut p = self.path(m, lo, lo + k);
            p.push(self.mth(lo + k, hi));
            p
        } else {
            let mut p = self.path(m - k, lo + k, hi);
            p.push(self.mth(lo, lo + k));
            p
        }
    }

    /// The consistency proof from the tree of `old_size` leaves to the tree of `size`.
    pub fn consistency_proof(&self, old_size: usize, size: usize) -> Option<Vec<Hash>> {
        (old_size > 0 && old_size <= size && size <= self.len()).then(|| self.subproof(old_size, 0, size, true))
    }

    fn subproof(&self, m: usize, lo: usize, hi: usize, complete: bool) -> Vec<Hash> {
        let n = hi - lo;
        if m == n {
            return if complete { Vec::new() } else { vec![self.mth(lo, hi)] };
        }
        let k = split(n);
        if m <= k {
            let mut p = self.subproof(m, lo, lo + k, complete);
            p.push(self.mth(lo + k, hi));
            p
        } else {
            let mut p = self.subproof(m - k, lo + k, hi, false);
            p.push(self.mth(lo, lo + k));
            p
        }
    }
}

/// The bytes a tree head's signature covers.
pub fn tree_head_message(size: u64, root: &Hash, timestamp_ms: i64) -> Vec<u8> {
    [TREE_HEAD_CONTEXT, &size.to_be_bytes(), root, &timestamp_ms.to_be_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(format!("leaf {i}").as_bytes())).collect()
    }

    #[test]
    fn the_empty_tree_and_rfc_6962_shapes() {
        assert_eq!(hex::encode(root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let l = leaves(3);
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_wrong_one_does_not() {
        for n in 1..=33 {
            let l = leaves(n);
            let r = root(&l);
            for i in 0..n {
                let proof = inclusion_proof(&l, i).unwrap();
                assert!(verify_inclusion(&l[i], i as u64, n as u64, &proof, &r), "n {n} i {i}");
                assert!(!verify_inclusion(&leaf_hash(b"other"), i as u64, n as u64, &proof, &r));
                if n > 1 {
                    assert!(!verify_inclusion(&l[i], ((i + 1) % n) as u64, n as u64, &proof, &r), "n {n} i {i}");
                }
            }
            assert!(inclusion_proof(&l, n).is_none());
        }
    }

    #[test]
    fn the_kept_tree_answers_as_the_recomputed_one() {
        let l = leaves(70);
        let mut tree = Tree::default();
        for (n, leaf) in l.iter().enumerate() {
            tree.push(*leaf);
            assert_eq!(tree.len(), n + 1);
        }
        for size in 0..=70 {
            assert_eq!(tree.root(size), root(&l[..size]), "size {size}");
            for i in 0..size {
                assert_eq!(tree.inclusion_proof(i, size), inclusion_proof(&l[..size], i), "size {size} i {i}");
            }
            for m in 1..=size {
                assert_eq!(tree.consistency_proof(m, size), consistency_proof(&l[..size], m), "m {m} size {size}");
            }
        }
        assert!(tree.inclusion_proof(3, 71).is_none() && tree.consistency_proof(0, 5).is_none());
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_rewritten_history_does_not() {
        for n in 1..=33 {
            let l = leaves(n);
            for m in 1..=n {
                let proof = consistency_proof(&l, m).unwrap();
                assert!(verify_consistency(m as u64, n as u64, &root(&l[..m]), &root(&l), &proof), "m {m} n {n}");
                // The same sizes with one old leaf changed: not a prefix any more.
                let mut rewritten = l.clone();
                rewritten[m - 1] = leaf_hash(b"rewritten");
                let forged = consistency_proof(&rewritten, m).unwrap();
                assert!(
                    !verify_consistency(m as u64, n as u64, &root(&l[..m]), &root(&rewritten), &forged),
                    "m {m} n {n}"
                );
            }
        }
    }
}
