#!/usr/bin/env python3
"""Test vectors for docs/merkle-log.md (vitaltrail Merkle log, v1).

Independent of the Rust code: RFC 9162 section 2.1 written out with BLAKE3.
Reproduce with:

    python3 -m venv venv && venv/bin/pip install blake3 && venv/bin/python merkle_vectors.py

Leaves are given as raw leaf bytes: leaf hash = BLAKE3(0x00 || leaf).
"""
import blake3


def H(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def leaf_hash(leaf: bytes) -> bytes:
    return H(b"\x00" + leaf)


def node_hash(left: bytes, right: bytes) -> bytes:
    return H(b"\x01" + left + right)


def split(n: int) -> int:
    """Largest power of two strictly less than n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: list) -> bytes:
    """RFC 9162 section 2.1.1 Merkle Tree Hash."""
    n = len(leaves)
    if n == 0:
        return H(b"")
    if n == 1:
        return leaf_hash(leaves[0])
    k = split(n)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: list) -> list:
    """RFC 9162 section 2.1.3.1 inclusion proof PATH(m, D[n]), deepest first."""
    n = len(leaves)
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return path(m, leaves[:k]) + [mth(leaves[k:])]
    return path(m - k, leaves[k:]) + [mth(leaves[:k])]


def subproof(m: int, leaves: list, b: bool) -> list:
    n = len(leaves)
    if m == n:
        return [] if b else [mth(leaves)]
    k = split(n)
    if m <= k:
        return subproof(m, leaves[:k], b) + [mth(leaves[k:])]
    return subproof(m - k, leaves[k:], False) + [mth(leaves[:k])]


def proof(m: int, leaves: list) -> list:
    """RFC 9162 section 2.1.4.1 consistency proof PROOF(m, D[n]), 0 < m < n."""
    return subproof(m, leaves, True)


def verify_inclusion(leaf_h: bytes, index: int, size: int, proof: list, root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2, as in docs/merkle-log.md."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_h
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: list) -> bool:
    """RFC 9162 section 2.1.4.2 plus the two edge cases of docs/merkle-log.md."""
    if old > new:
        return False
    if old == new:
        return proof == [] and old_root == new_root
    if old == 0:
        return proof == [] and old_root == H(b"")
    if not proof:
        return False
    p = ([old_root] if old & (old - 1) == 0 else []) + list(proof)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = p[0]
    for c in p[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


def stored_hash_index(level: int, n: int) -> int:
    """Position of the n'th complete subtree of 2^level leaves (Go sumdb/tlog)."""
    for _ in range(level):
        n = 2 * n + 1
    i = 0
    while n > 0:
        i += n
        n >>= 1
    return i + level


def stored_hash_count(n: int) -> int:
    return 2 * n - bin(n).count("1")


def encode_leaf(log_time_ms: int, envelope: bytes) -> bytes:
    """docs/merkle-log.md leaf v1: 0x01 || u64 BE log time || envelope."""
    return b"\x01" + log_time_ms.to_bytes(8, "big") + envelope


def hx(b: bytes) -> str:
    return b.hex()


def main() -> None:
    a, b, c = b"a", b"b", b"c"
    three = [a, b, c]

    print("# Hashes")
    print("empty root      BLAKE3(\"\")              ", hx(mth([])))
    print("leaf_hash(a)    BLAKE3(00 61)            ", hx(leaf_hash(a)))
    print("leaf_hash(b)    BLAKE3(00 62)            ", hx(leaf_hash(b)))
    print("leaf_hash(c)    BLAKE3(00 63)            ", hx(leaf_hash(c)))
    print("node(ab)        BLAKE3(01 h(a) h(b))     ", hx(node_hash(leaf_hash(a), leaf_hash(b))))

    print("# Roots")
    print("root []         ", hx(mth([])))
    print("root [a]        ", hx(mth([a])))
    print("root [a,b]      ", hx(mth([a, b])))
    print("root [a,b,c]    ", hx(mth(three)))
    assert mth([a]) == leaf_hash(a)
    assert mth(three) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))

    print("# Inclusion proofs in [a,b,c] (deepest sibling first)")
    root3 = mth(three)
    for m in range(3):
        pr = path(m, three)
        assert verify_inclusion(leaf_hash(three[m]), m, 3, pr, root3)
        # A wrong index must fail.
        assert not verify_inclusion(leaf_hash(three[m]), (m + 1) % 3, 3, pr, root3)
        print(f"index {m}: [" + ", ".join(hx(h) for h in pr) + "]")
    assert path(2, three) == [node_hash(leaf_hash(a), leaf_hash(b))]
    assert path(0, three) == [leaf_hash(b), leaf_hash(c)]

    print("# Consistency proofs into [a,b,c]")
    for m in (1, 2):
        pr = proof(m, three)
        assert verify_consistency(m, 3, mth(three[:m]), root3, pr)
        assert not verify_consistency(m, 3, mth(three[:m]), mth([a, b, b]), pr)
        print(f"{m} -> 3: [" + ", ".join(hx(h) for h in pr) + "]")
    assert proof(2, three) == [leaf_hash(c)]
    assert proof(1, three) == [leaf_hash(b), leaf_hash(c)]
    assert verify_consistency(0, 3, mth([]), root3, [])
    assert verify_consistency(3, 3, root3, root3, [])

    print("# A vitaltrail leaf (log time 1700000000100 ms, envelope bytes 'abc')")
    leaf = encode_leaf(1700000000100, b"abc")
    print("leaf bytes      ", hx(leaf))
    print("leaf hash       ", hx(leaf_hash(leaf)))

    print("# Stored-hash positions (level, n) -> index, for a tree of 8 leaves")
    order = []
    for n in range(8):
        order.append((0, n))
        lvl, x = 0, n
        while x & 1:
            lvl += 1
            x >>= 1
            order.append((lvl, x))
    for i, (lvl, n) in enumerate(order):
        assert stored_hash_index(lvl, n) == i, (lvl, n, i)
    print(", ".join(f"({l},{n})->{stored_hash_index(l, n)}" for l, n in order))
    # Closed form: with m = (n + 1) * 2^level - 1, index = 2m - popcount(m) + level.
    for lvl in range(6):
        for n in range(200):
            m = ((n + 1) << lvl) - 1
            assert stored_hash_index(lvl, n) == 2 * m - bin(m).count("1") + lvl
    assert [stored_hash_count(n) for n in range(9)] == [0, 1, 3, 4, 7, 8, 10, 11, 15]

    # Self-check the recursive definitions against the verifiers on more shapes.
    for n in range(1, 40):
        ls = [bytes([i]) * (i % 5 + 1) for i in range(n)]
        r = mth(ls)
        for m in range(n):
            assert verify_inclusion(leaf_hash(ls[m]), m, n, path(m, ls), r)
        for m in range(1, n):
            assert verify_consistency(m, n, mth(ls[:m]), r, proof(m, ls))
    print("all self-checks passed")


if __name__ == "__main__":
    main()
