#!/usr/bin/env python3
"""Worked examples for docs/checkpoint.md and docs/proof-bundle.md.

Builds a 3-leaf vitaltrail log from the pycose fixture envelopes
(core/tests/fixtures/cose/manifest.json), signs a checkpoint for it as a
C2SP signed note, and assembles the proof bundle of leaf 0. Ed25519 is
deterministic, so the output is byte-stable.

    python3 -m venv venv && venv/bin/pip install blake3 cryptography
    venv/bin/python checkpoint_bundle_vectors.py            # print
    venv/bin/python checkpoint_bundle_vectors.py --write    # also write example_bundle.json, example_log.vkey
"""
import base64
import hashlib
import json
import os
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from merkle_vectors import encode_leaf, leaf_hash, mth, path, verify_inclusion

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "..", "..", "core", "tests", "fixtures", "cose", "manifest.json")

LOG_NAME = "vitaltrail.example/log/0"
LOG_SEED = bytes([0x0B] * 32)  # example only; never use a fixed seed for a real log
B64 = base64.b64encode


def key_id(name: str, encoded_key: bytes) -> int:
    """C2SP signed-note: SHA-256(name || 0x0A || alg byte || public key)[:4], big-endian."""
    return int.from_bytes(hashlib.sha256(name.encode() + b"\n" + encoded_key).digest()[:4], "big")


def verifier_key(name: str, pub: bytes) -> str:
    enc = b"\x01" + pub
    return f"{name}+{key_id(name, enc):08x}+{B64(enc).decode()}"


def sign_note(text: str, name: str, seed: bytes) -> str:
    assert text.endswith("\n") and "\n\n" not in text
    sk = Ed25519PrivateKey.from_private_bytes(seed)
    pub = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sig = sk.sign(text.encode())
    kid = key_id(name, b"\x01" + pub).to_bytes(4, "big")
    return text + "\n" + f"\u2014 {name} {B64(kid + sig).decode()}\n"


def open_note(note: str, vkey: str) -> str:
    """Verify `note` with verifier key `vkey`; return the text (checkpoint body)."""
    name, kid_hex, key_b64 = vkey.split("+", 2)  # key data may contain "+"
    enc = base64.b64decode(key_b64, validate=True)
    assert len(kid_hex) == 8 and int(kid_hex, 16) == key_id(name, enc) and enc[0] == 1
    pub = Ed25519PublicKey.from_public_bytes(enc[1:])
    text, sigs = note.rsplit("\n\n", 1)
    text += "\n"
    ok = False
    for line in sigs.rstrip("\n").split("\n"):
        assert line.startswith("\u2014 ")
        sname, b64sig = line[2:].split(" ", 1)
        raw = base64.b64decode(b64sig, validate=True)
        if sname == name and int.from_bytes(raw[:4], "big") == int(kid_hex, 16):
            pub.verify(raw[4:], text.encode())  # raises on failure
            ok = True
    assert ok, "no signature by the log key"
    assert text.split("\n", 1)[0] == name, "origin must equal the key name"
    return text


def checkpoint_body(origin: str, size: int, root: bytes, extensions=()) -> str:
    return f"{origin}\n{size}\n{B64(root).decode()}\n" + "".join(e + "\n" for e in extensions)


def main() -> None:
    # Sanity check of key_id against the signed-note reference example.
    ref = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    assert key_id("PeterNeumann", base64.b64decode(ref.split("+", 2)[2])) == 0xC74F20A3
    ref_note = (
        "If you think cryptography is the answer to your problem,\n"
        "then you don't know what your problem is.\n"
        "\n"
        "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
    )
    ref_pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(ref.split("+", 2)[2])[1:])
    ref_text, ref_sig = ref_note.split("\n\n")
    ref_pub.verify(base64.b64decode(ref_sig.split(" ")[-1])[4:], (ref_text + "\n").encode())

    cases = {c["name"]: bytes.fromhex(c["cose_hex"]) for c in json.load(open(MANIFEST))["cases"]}
    envelopes = [cases["valid_int"], cases["valid_multi_meta"], cases["valid_key_b_canonical"]]
    times = [1700000000100, 1700000000101, 1700000000102]
    leaves = [encode_leaf(t, e) for t, e in zip(times, envelopes)]
    root = mth(leaves)

    pub = Ed25519PrivateKey.from_private_bytes(LOG_SEED).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw
    )
    vkey = verifier_key(LOG_NAME, pub)
    body = checkpoint_body(LOG_NAME, len(leaves), root)
    note = sign_note(body, LOG_NAME, LOG_SEED)
    assert open_note(note, vkey) == body

    index = 0
    proof = path(index, leaves)
    assert verify_inclusion(leaf_hash(leaves[index]), index, len(leaves), proof, root)
    bundle = {
        "format": "vitaltrail/proof-bundle/v1",
        "envelope": B64(envelopes[index]).decode(),
        "log_time_ms": times[index],
        "leaf_index": index,
        "inclusion_proof": [B64(h).decode() for h in proof],
        "checkpoint": note,
    }
    text = json.dumps(bundle, indent=2, ensure_ascii=False)

    print("log public key (hex)   ", pub.hex())
    print("key ID                 ", format(key_id(LOG_NAME, bytes([1]) + pub), "08x"))
    print("verifier key           ", vkey)
    for i, l in enumerate(leaves):
        print(f"leaf {i} hash            ", leaf_hash(l).hex())
    print("root (hex)             ", root.hex())
    print("--- checkpoint note ---")
    print(note, end="")
    print("--- proof bundle ---")
    print(text)
    if "--write" in sys.argv:
        with open(os.path.join(HERE, "example_bundle.json"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        with open(os.path.join(HERE, "example_log.vkey"), "w", encoding="utf-8") as f:
            f.write(vkey + "\n")
        print("wrote example_bundle.json and example_log.vkey")


if __name__ == "__main__":
    main()
