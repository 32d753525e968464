//! The Merkle log math: RFC 9162 tree structure with BLAKE3.
//!
//! * leaf hash = `BLAKE3(0x00 ‖ leaf)`, node hash = `BLAKE3(0x01 ‖ left ‖ right)`;
//!   the root of the empty tree is `BLAKE3("")` (RFC 9162 §2.1.1).
//! * Inclusion and consistency proofs follow RFC 9162 §2.1.3 and §2.1.4, and
//!   are verified with the RFC's iterative algorithms.
//!
//! # Storage layout
//!
//! A log is persisted as one append-only sequence of *stored hashes*, the
//! layout of `golang.org/x/mod/sumdb/tlog` on which C2SP tlog-tiles is built:
//! after leaf `n` is appended, its leaf hash is stored, followed by the hash of
//! every complete subtree that leaf completes (one per trailing 1 bit of `n`).
//! [`stored_hash_index`] maps `(level, n)` (the `n`th complete subtree of
//! `2^level` leaves) to its position in that sequence. Every hash that a root
//! or proof needs is a complete subtree, so a storage layer only has to answer
//! [`HashReader::read_hashes`] for a handful of positions; nothing is ever
//! rewritten, and no proof needs more than `O(log n)` reads.
//!
//! The [`Frontier`] (a.k.a. compact range) is the list of complete subtrees
//! that make up the current tree: it is all the state needed to append, and it
//! is rebuilt from storage with one [`HashReader::read_hashes`] call.

use std::fmt;

use crate::error::{Error, Result};

/// Domain-separation prefix of a leaf hash.
pub const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of an interior node hash.
pub const NODE_PREFIX: u8 = 0x01;

/// A 32-byte BLAKE3 hash of a leaf, node or tree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self> {
        blake3::Hash::from_hex(s)
            .map(|h| Hash(*h.as_bytes()))
            .map_err(|_| Error::InvalidProofRequest(format!("not a 32-byte hex hash: {s:?}")))
    }

    /// Standard base64 (the form used in checkpoints and proof bundles).
    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Parse standard base64 of exactly 32 bytes.
    pub fn from_base64(s: &str) -> Option<Self> {
        use base64::Engine;
        let v = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        Some(Hash(v.try_into().ok()?))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_hex())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// `BLAKE3(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF_PREFIX]);
    h.update(leaf);
    Hash(*h.finalize().as_bytes())
}

/// `BLAKE3(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buf = [0u8; 65];
    buf[0] = NODE_PREFIX;
    buf[1..33].copy_from_slice(&left.0);
    buf[33..].copy_from_slice(&right.0);
    Hash(*blake3::hash(&buf).as_bytes())
}

/// Root of the empty tree: `BLAKE3("")`.
pub fn empty_root() -> Hash {
    Hash(*blake3::hash(b"").as_bytes())
}

/// Position in the stored-hash sequence of the `n`th complete subtree at
/// `level` (a subtree of `2^level` leaves starting at leaf `n << level`).
pub fn stored_hash_index(level: u8, n: u64) -> u64 {
    // Level L's n'th hash is written right after level L+1's 2n+1'th hash.
    let mut n = n;
    for _ in 0..level {
        n = 2 * n + 1;
    }
    // Level 0's n'th hash is written at n + n/2 + n/4 + ...
    let mut i = 0u64;
    while n > 0 {
        i += n;
        n >>= 1;
    }
    i + u64::from(level)
}

/// The inverse of [`stored_hash_index`]: `(level, n)` of a stored position.
pub fn split_stored_hash_index(index: u64) -> (u8, u64) {
    // stored_hash_index(0, n) <= 2n, so the leaf we want is in
    // [index/2, index/2 + log2(index)].
    let mut n = index / 2;
    let mut index_n = stored_hash_index(0, n);
    debug_assert!(index_n <= index);
    loop {
        // Each new leaf n adds 1 + trailing_ones(n) hashes.
        let x = index_n + 1 + u64::from((n + 1).trailing_zeros());
        if x > index {
            break;
        }
        n += 1;
        index_n = x;
    }
    let level = (index - index_n) as u8;
    (level, n >> level)
}

/// How many hashes are stored for a tree of `n` leaves.
pub fn stored_hash_count(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let mut count = stored_hash_index(0, n - 1) + 1;
    let mut i = n - 1;
    while i & 1 != 0 {
        count += 1;
        i >>= 1;
    }
    count
}

/// Random access to stored hashes (see the module docs). Implemented by the
/// in-memory [`MemoryTree`] and by durable storage in other crates.
pub trait HashReader {
    /// The storage error; core's own errors convert into it.
    type Error: From<Error>;

    /// Return the stored hashes at `indexes`, in the same order.
    fn read_hashes(&self, indexes: &[u64]) -> std::result::Result<Vec<Hash>, Self::Error>;
}

fn read_exact<R: HashReader>(r: &R, indexes: &[u64]) -> std::result::Result<Vec<Hash>, R::Error> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let hashes = r.read_hashes(indexes)?;
    if hashes.len() != indexes.len() {
        return Err(Error::HashCount {
            want: indexes.len(),
            got: hashes.len(),
        }
        .into());
    }
    Ok(hashes)
}

/// Largest power of two strictly less than `n` (for `n >= 2`), with its log2.
fn split_point(n: u64) -> (u64, u8) {
    debug_assert!(n >= 2);
    let level = 63 - (n - 1).leading_zeros() as u8;
    (1u64 << level, level)
}

/// Stored positions of the complete subtrees that make up leaves `[lo, hi)`.
fn sub_tree_index(mut lo: u64, hi: u64, need: &mut Vec<u64>) {
    while lo < hi {
        let (k, level) = split_point(hi - lo + 1);
        debug_assert_eq!(lo & (k - 1), 0);
        need.push(stored_hash_index(level, lo >> level));
        lo += k;
    }
}

/// Combine the hashes collected by [`sub_tree_index`] for `[lo, hi)`.
fn sub_tree_hash(mut lo: u64, hi: u64, hashes: &[Hash]) -> (Hash, &[Hash]) {
    let mut num = 0usize;
    while lo < hi {
        let (k, _) = split_point(hi - lo + 1);
        num += 1;
        lo += k;
    }
    let mut h = hashes[num - 1];
    for i in (0..num - 1).rev() {
        h = node_hash(&hashes[i], &h);
    }
    (h, &hashes[num..])
}

/// The root of the first `n` leaves.
pub fn tree_hash<R: HashReader>(n: u64, r: &R) -> std::result::Result<Hash, R::Error> {
    if n == 0 {
        return Ok(empty_root());
    }
    let mut need = Vec::new();
    sub_tree_index(0, n, &mut need);
    let hashes = read_exact(r, &need)?;
    Ok(sub_tree_hash(0, n, &hashes).0)
}

fn leaf_proof_index(lo: u64, hi: u64, n: u64, need: &mut Vec<u64>) {
    if lo + 1 == hi {
        return;
    }
    let (k, _) = split_point(hi - lo);
    if n < lo + k {
        leaf_proof_index(lo, lo + k, n, need);
        sub_tree_index(lo + k, hi, need);
    } else {
        sub_tree_index(lo, lo + k, need);
        leaf_proof_index(lo + k, hi, n, need);
    }
}

fn leaf_proof<'a>(lo: u64, hi: u64, n: u64, hashes: &'a [Hash], out: &mut Vec<Hash>) -> &'a [Hash] {
    if lo + 1 == hi {
        return hashes;
    }
    let (k, _) = split_point(hi - lo);
    if n < lo + k {
        let rest = leaf_proof(lo, lo + k, n, hashes, out);
        let (th, rest) = sub_tree_hash(lo + k, hi, rest);
        out.push(th);
        rest
    } else {
        let (th, rest) = sub_tree_hash(lo, lo + k, hashes);
        let rest = leaf_proof(lo + k, hi, n, rest, out);
        out.push(th);
        rest
    }
}

/// Inclusion proof (RFC 9162 `PATH`) of leaf `index` in the tree of `size`
/// leaves, deepest sibling first.
pub fn prove_inclusion<R: HashReader>(
    size: u64,
    index: u64,
    r: &R,
) -> std::result::Result<Vec<Hash>, R::Error> {
    if index >= size {
        return Err(Error::InvalidProofRequest(format!(
            "leaf index {index} is not below tree size {size}"
        ))
        .into());
    }
    let mut need = Vec::new();
    leaf_proof_index(0, size, index, &mut need);
    let hashes = read_exact(r, &need)?;
    let mut out = Vec::with_capacity(64);
    leaf_proof(0, size, index, &hashes, &mut out);
    Ok(out)
}

fn tree_proof_index(lo: u64, hi: u64, n: u64, need: &mut Vec<u64>) {
    if n == hi {
        if lo != 0 {
            sub_tree_index(lo, hi, need);
        }
        return;
    }
    let (k, _) = split_point(hi - lo);
    if n <= lo + k {
        tree_proof_index(lo, lo + k, n, need);
        sub_tree_index(lo + k, hi, need);
    } else {
        sub_tree_index(lo, lo + k, need);
        tree_proof_index(lo + k, hi, n, need);
    }
}

fn tree_proof<'a>(lo: u64, hi: u64, n: u64, hashes: &'a [Hash], out: &mut Vec<Hash>) -> &'a [Hash] {
    if n == hi {
        if lo == 0 {
            return hashes;
        }
        let (th, rest) = sub_tree_hash(lo, hi, hashes);
        out.push(th);
        return rest;
    }
    let (k, _) = split_point(hi - lo);
    if n <= lo + k {
        let rest = tree_proof(lo, lo + k, n, hashes, out);
        let (th, rest) = sub_tree_hash(lo + k, hi, rest);
        out.push(th);
        rest
    } else {
        let (th, rest) = sub_tree_hash(lo, lo + k, hashes);
        let rest = tree_proof(lo + k, hi, n, rest, out);
        out.push(th);
        rest
    }
}

/// Consistency proof (RFC 9162 `PROOF`) that the tree of `old` leaves is a
/// prefix of the tree of `new` leaves. Empty when `old == new` or `old == 0`.
pub fn prove_consistency<R: HashReader>(
    old: u64,
    new: u64,
    r: &R,
) -> std::result::Result<Vec<Hash>, R::Error> {
    if old > new {
        return Err(Error::InvalidProofRequest(format!(
            "old size {old} is larger than new size {new}"
        ))
        .into());
    }
    if old == 0 || old == new {
        return Ok(Vec::new());
    }
    let mut need = Vec::new();
    tree_proof_index(0, new, old, &mut need);
    let hashes = read_exact(r, &need)?;
    let mut out = Vec::with_capacity(64);
    tree_proof(0, new, old, &hashes, &mut out);
    Ok(out)
}

/// Verify an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<()> {
    if index >= size {
        return Err(Error::ProofMismatch(
            "leaf index is not below the tree size",
        ));
    }
    let mut fn_ = index;
    let mut sn = size - 1;
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(Error::ProofMismatch("inclusion proof is too long"));
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
    if sn != 0 {
        return Err(Error::ProofMismatch("inclusion proof is too short"));
    }
    if r != *root {
        return Err(Error::ProofMismatch(
            "inclusion proof does not lead to the root",
        ));
    }
    Ok(())
}

/// Verify a consistency proof between two tree heads (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<()> {
    if old_size > new_size {
        return Err(Error::ProofMismatch("old tree is larger than new tree"));
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(Error::ProofMismatch(
                "proof between equal sizes must be empty",
            ));
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(Error::ProofMismatch("equal sizes with different roots"))
        };
    }
    if old_size == 0 {
        // Every tree extends the empty tree; the proof is empty.
        if !proof.is_empty() {
            return Err(Error::ProofMismatch(
                "proof from the empty tree must be empty",
            ));
        }
        return if *old_root == empty_root() {
            Ok(())
        } else {
            Err(Error::ProofMismatch("root of the empty tree is wrong"))
        };
    }
    if proof.is_empty() {
        return Err(Error::ProofMismatch("consistency proof is empty"));
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let mut fn_ = old_size - 1;
    let mut sn = new_size - 1;
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let mut fr = path[0];
    let mut sr = path[0];
    for c in &path[1..] {
        if sn == 0 {
            return Err(Error::ProofMismatch("consistency proof is too long"));
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(Error::ProofMismatch("consistency proof is too short"));
    }
    if fr != *old_root {
        return Err(Error::ProofMismatch(
            "consistency proof does not lead to the old root",
        ));
    }
    if sr != *new_root {
        return Err(Error::ProofMismatch(
            "consistency proof does not lead to the new root",
        ));
    }
    Ok(())
}

/// The compact range of a tree: the roots of its complete subtrees, largest
/// (leftmost) first. It is all the state an append needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// One hash per set bit of `size`, from the most significant bit down.
    hashes: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild the frontier of a stored tree of `size` leaves.
    pub fn load<R: HashReader>(size: u64, r: &R) -> std::result::Result<Self, R::Error> {
        let mut need = Vec::new();
        sub_tree_index(0, size, &mut need);
        let hashes = read_exact(r, &need)?;
        Ok(Frontier { size, hashes })
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The roots of the complete subtrees, largest first.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// The tree root.
    pub fn root(&self) -> Hash {
        let mut it = self.hashes.iter().rev();
        match it.next() {
            None => empty_root(),
            Some(last) => it.fold(*last, |acc, h| node_hash(h, &acc)),
        }
    }

    /// Append one leaf hash. Pushes onto `stored` the hashes to store for it,
    /// in stored order: the leaf hash, then each subtree it completes.
    pub fn append(&mut self, leaf: Hash, stored: &mut Vec<Hash>) {
        let n = self.size;
        let mut h = leaf;
        stored.push(h);
        let mut level = 0;
        while (n >> level) & 1 == 1 {
            // The invariant "one frontier hash per set bit of size" guarantees
            // a hash is present for every trailing 1 bit.
            let left = self.hashes.pop().unwrap_or_default();
            h = node_hash(&left, &h);
            stored.push(h);
            level += 1;
        }
        self.hashes.push(h);
        self.size = n + 1;
    }
}

/// An in-memory log: every stored hash in a `Vec`. Fast proofs, no I/O.
#[derive(Clone, Debug, Default)]
pub struct MemoryTree {
    frontier: Frontier,
    stored: Vec<Hash>,
}

impl MemoryTree {
    /// The empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree with room for `leaves` leaves without reallocating.
    pub fn with_capacity(leaves: usize) -> Self {
        MemoryTree {
            frontier: Frontier::new(),
            stored: Vec::with_capacity(leaves.saturating_mul(2)),
        }
    }

    /// Append a leaf (its bytes; the leaf hash is computed here). Returns its index.
    pub fn append(&mut self, leaf: &[u8]) -> u64 {
        self.append_hash(leaf_hash(leaf))
    }

    /// Append an already computed leaf hash. Returns its index.
    pub fn append_hash(&mut self, leaf: Hash) -> u64 {
        let index = self.frontier.size();
        self.frontier.append(leaf, &mut self.stored);
        index
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.frontier.size()
    }

    /// Current root.
    pub fn root(&self) -> Hash {
        self.frontier.root()
    }

    /// Root of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash> {
        self.check_size(size)?;
        tree_hash(size, self)
    }

    /// Hash of leaf `index`.
    pub fn leaf(&self, index: u64) -> Result<Hash> {
        if index >= self.size() {
            return Err(Error::InvalidProofRequest(format!("no leaf {index}")));
        }
        Ok(self.stored[stored_hash_index(0, index) as usize])
    }

    /// Inclusion proof of `index` in the tree of `size` leaves.
    pub fn prove_inclusion(&self, size: u64, index: u64) -> Result<Vec<Hash>> {
        self.check_size(size)?;
        prove_inclusion(size, index, self)
    }

    /// Consistency proof from `old` to `new` leaves.
    pub fn prove_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>> {
        self.check_size(new)?;
        prove_consistency(old, new, self)
    }

    fn check_size(&self, size: u64) -> Result<()> {
        if size > self.size() {
            return Err(Error::InvalidProofRequest(format!(
                "size {size} is beyond the tree size {}",
                self.size()
            )));
        }
        Ok(())
    }
}

impl HashReader for MemoryTree {
    type Error = Error;

    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>> {
        indexes
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.stored.get(i).copied())
                    .ok_or_else(|| Error::InvalidProofRequest(format!("no stored hash {i}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- naive reference, straight from RFC 9162 §2.1 ----

    fn mth(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = largest_pow2_below(n);
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn largest_pow2_below(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    fn path(m: usize, leaves: &[Vec<u8>]) -> Vec<Hash> {
        let n = leaves.len();
        if n == 1 {
            return vec![];
        }
        let k = largest_pow2_below(n);
        if m < k {
            let mut p = path(m, &leaves[..k]);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = path(m - k, &leaves[k..]);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn subproof(m: usize, leaves: &[Vec<u8>], b: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if b { vec![] } else { vec![mth(leaves)] };
        }
        let k = largest_pow2_below(n);
        if m <= k {
            let mut p = subproof(m, &leaves[..k], b);
            p.push(mth(&leaves[k..]));
            p
        } else {
            let mut p = subproof(m - k, &leaves[k..], false);
            p.push(mth(&leaves[..k]));
            p
        }
    }

    fn leaves(n: usize, salt: u64) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("leaf {i} salt {salt}").into_bytes())
            .collect()
    }

    fn tree_of(ls: &[Vec<u8>]) -> MemoryTree {
        let mut t = MemoryTree::new();
        for l in ls {
            t.append(l);
        }
        t
    }

    #[test]
    fn known_shapes() {
        // Sizes 0..=8 by hand: the RFC split puts the largest power of two
        // strictly below n on the left.
        let ls = leaves(7, 0);
        let h: Vec<Hash> = ls.iter().map(|l| leaf_hash(l)).collect();
        let n01 = node_hash(&h[0], &h[1]);
        let n23 = node_hash(&h[2], &h[3]);
        let n45 = node_hash(&h[4], &h[5]);
        let expect7 = node_hash(&node_hash(&n01, &n23), &node_hash(&n45, &h[6]));
        assert_eq!(tree_of(&ls).root(), expect7);
        assert_eq!(tree_of(&ls[..3]).root(), node_hash(&n01, &h[2]));
        assert_eq!(tree_of(&[]).root(), Hash(*blake3::hash(b"").as_bytes()));
        assert_eq!(tree_of(&ls[..1]).root(), h[0]);
        // Domain separation: a leaf and a node never collide by construction.
        assert_ne!(
            leaf_hash(&[0u8; 64]),
            node_hash(&Hash([0; 32]), &Hash([0; 32]))
        );
    }

    #[test]
    fn stored_index_roundtrip() {
        let mut t = MemoryTree::new();
        for i in 0..300u64 {
            t.append(&i.to_le_bytes());
            assert_eq!(t.stored.len() as u64, stored_hash_count(t.size()));
        }
        for idx in 0..t.stored.len() as u64 {
            let (level, n) = split_stored_hash_index(idx);
            assert_eq!(stored_hash_index(level, n), idx);
        }
    }

    #[test]
    fn exhaustive_small_trees_match_reference() {
        for n in 0..=70usize {
            let ls = leaves(n, 7);
            let t = tree_of(&ls);
            assert_eq!(t.root(), mth(&ls), "root n={n}");
            for m in 0..n {
                let p = t.prove_inclusion(n as u64, m as u64).unwrap();
                assert_eq!(p, path(m, &ls), "path m={m} n={n}");
                verify_inclusion(&leaf_hash(&ls[m]), m as u64, n as u64, &p, &t.root()).unwrap();
            }
            for m in 1..=n {
                let p = t.prove_consistency(m as u64, n as u64).unwrap();
                let expect = if m == n {
                    vec![]
                } else {
                    subproof(m, &ls, true)
                };
                assert_eq!(p, expect, "consistency m={m} n={n}");
                verify_consistency(m as u64, n as u64, &mth(&ls[..m]), &t.root(), &p).unwrap();
                assert_eq!(t.root_at(m as u64).unwrap(), mth(&ls[..m]));
            }
        }
    }

    #[test]
    fn frontier_reloads_from_storage() {
        let t = tree_of(&leaves(1000, 3));
        for size in [0u64, 1, 2, 3, 511, 512, 513, 999, 1000] {
            let f = Frontier::load(size, &t).unwrap();
            assert_eq!(f.root(), t.root_at(size).unwrap());
            assert_eq!(f.hashes().len() as u32, size.count_ones());
        }
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        let t = tree_of(&leaves(5, 1));
        assert!(t.prove_inclusion(5, 5).is_err());
        assert!(t.prove_inclusion(6, 0).is_err());
        assert!(t.prove_consistency(4, 3).is_err());
        assert!(t.prove_consistency(3, 9).is_err());
        assert!(verify_inclusion(&Hash::default(), 3, 3, &[], &Hash::default()).is_err());
        assert!(verify_consistency(4, 3, &Hash::default(), &Hash::default(), &[]).is_err());
        assert!(verify_consistency(2, 3, &Hash::default(), &Hash::default(), &[]).is_err());
    }

    fn flip(h: &Hash, byte: usize, bit: u8) -> Hash {
        let mut x = *h;
        x.0[byte % 32] ^= 1 << (bit % 8);
        x
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_trees_match_reference(n in 0usize..2000, salt in any::<u64>(), picks in proptest::collection::vec(any::<u64>(), 4)) {
            let ls = leaves(n, salt);
            let t = tree_of(&ls);
            prop_assert_eq!(t.root(), mth(&ls));
            if n > 0 {
                for p in &picks {
                    let m = (*p % n as u64) as usize;
                    let size = m + 1 + (*p as usize / 7) % (n - m);
                    let proof = t.prove_inclusion(size as u64, m as u64).unwrap();
                    prop_assert_eq!(&proof, &path(m, &ls[..size]));
                    let root = mth(&ls[..size]);
                    verify_inclusion(&leaf_hash(&ls[m]), m as u64, size as u64, &proof, &root).unwrap();
                    let old = 1 + (*p as usize / 13) % size;
                    let cp = t.prove_consistency(old as u64, size as u64).unwrap();
                    if old < size {
                        prop_assert_eq!(&cp, &subproof(old, &ls[..size], true));
                    }
                    verify_consistency(old as u64, size as u64, &mth(&ls[..old]), &root, &cp).unwrap();
                }
            }
        }

        #[test]
        fn large_random_trees_match_reference(n in 2000usize..20000, salt in any::<u64>(), pick in any::<u64>()) {
            let ls = leaves(n, salt);
            let t = tree_of(&ls);
            prop_assert_eq!(t.root(), mth(&ls));
            let m = (pick % n as u64) as usize;
            let proof = t.prove_inclusion(n as u64, m as u64).unwrap();
            prop_assert_eq!(&proof, &path(m, &ls));
        }

        #[test]
        fn any_flipped_byte_breaks_inclusion(n in 1usize..300, pick in any::<u64>(), byte in 0usize..32, bit in 0u8..8, target in 0u8..3) {
            let ls = leaves(n, pick);
            let t = tree_of(&ls);
            let m = (pick % n as u64) as usize;
            let mut proof = t.prove_inclusion(n as u64, m as u64).unwrap();
            let mut leaf = leaf_hash(&ls[m]);
            let mut root = t.root();
            match target {
                0 if !proof.is_empty() => { let i = pick as usize % proof.len(); proof[i] = flip(&proof[i], byte, bit); }
                1 => leaf = flip(&leaf, byte, bit),
                _ => root = flip(&root, byte, bit),
            }
            prop_assert!(verify_inclusion(&leaf, m as u64, n as u64, &proof, &root).is_err());
        }

        #[test]
        fn any_flipped_byte_breaks_consistency(n in 2usize..300, pick in any::<u64>(), byte in 0usize..32, bit in 0u8..8, target in 0u8..3) {
            let ls = leaves(n, pick);
            let t = tree_of(&ls);
            let old = 1 + (pick as usize % (n - 1));
            let mut proof = t.prove_consistency(old as u64, n as u64).unwrap();
            let mut old_root = t.root_at(old as u64).unwrap();
            let mut new_root = t.root();
            match target {
                0 => { let i = pick as usize % proof.len(); proof[i] = flip(&proof[i], byte, bit); }
                1 => old_root = flip(&old_root, byte, bit),
                _ => new_root = flip(&new_root, byte, bit),
            }
            prop_assert!(verify_consistency(old as u64, n as u64, &old_root, &new_root, &proof).is_err());
        }

        #[test]
        fn wrong_index_or_size_fails(n in 2usize..300, pick in any::<u64>()) {
            let ls = leaves(n, pick);
            let t = tree_of(&ls);
            let m = (pick % n as u64) as usize;
            let proof = t.prove_inclusion(n as u64, m as u64).unwrap();
            let leaf = leaf_hash(&ls[m]);
            let other = (m + 1) % n;
            prop_assert!(verify_inclusion(&leaf, other as u64, n as u64, &proof, &t.root()).is_err());
            // (A different size with the same root can pass: the size is
            // bound to the root by the signed checkpoint, not by the proof.)
        }
    }
}
