#!/usr/bin/env python3
"""An independent device that follows docs/receipts.md, written from the
docs alone: paho-mqtt for MQTT, `cryptography` for Ed25519, `blake3` for the
hashes. It publishes the envelopes it is given (QoS 1), keeps each until its
receipt verifies against the log's verifier key, resends what is still
unreceipted, and prints a JSON summary.

usage: receipt_device.py HOST PORT DID VKEY ENVELOPE_FILE... [--junk] [--resend-first]
"""
import base64
import hashlib
import json
import sys
import threading
import time

import blake3
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def b64(s):
    """Strict standard base64: canonical padding, no whitespace."""
    raw = base64.b64decode(s, validate=True)
    if base64.b64encode(raw).decode() != s:
        raise ValueError("non-canonical base64")
    return raw


def parse_vkey(vkey):
    name, keyid, rest = vkey.strip().split("+", 2)
    raw = b64(rest)
    assert raw[0] == 1 and len(raw) == 33, "not an Ed25519 verifier key"
    pub = raw[1:]
    want = hashlib.sha256(name.encode() + b"\n" + b"\x01" + pub).digest()[:4]
    assert want.hex() == keyid, "key ID mismatch"
    return name, want, Ed25519PublicKey.from_public_bytes(pub)


def open_checkpoint(note, key):
    """checkpoint.md §4: split at the last blank line, verify the first
    signature line of our key over the body; return (origin, size, root)."""
    name, keyid, pub = key
    assert note.endswith("\n")
    cut = note.rindex("\n\n")
    body, sigs = note[: cut + 1], note[cut + 2 :]
    for line in sigs.splitlines():
        dash, who, sig = line.split(" ")
        assert dash == "\u2014"
        raw = b64(sig)
        if who == name and raw[:4] == keyid:
            pub.verify(raw[4:], body.encode())  # raises on a bad signature
            origin, size, root = body.split("\n")[:3]
            assert origin == name, "origin is not the key's name"
            return origin, int(size), b64(root)
    raise ValueError("no signature by the log key")


def node(l, r):
    return blake3.blake3(b"\x01" + l + r).digest()


def verify_inclusion(leaf, index, size, proof, root):
    """RFC 9162 §2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = {a for a in sys.argv[1:] if a.startswith("--") and "=" not in a}
    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    host, port, did, vkey = args[0], int(args[1]), args[2], args[3]
    key = parse_vkey(open(vkey).read())
    pending = {}  # message_hash -> bytes
    for path in args[4:]:
        m = open(path, "rb").read()
        pending[base64.b64encode(blake3.blake3(m).digest()).decode()] = m
    junk = b"\xa5" * 100
    if "--junk" in flags:
        pending[base64.b64encode(blake3.blake3(junk).digest()).decode()] = junk
    summary = {"verified": 0, "duplicates": 0, "rejected": {}, "bad": 0, "resent": 0}
    lock = threading.Lock()
    subscribed = threading.Event()

    def on_connect(c, _u, _f, rc, _p=None):
        c.subscribe(f"receipts/{did}", qos=1)

    def on_subscribe(*_a):
        subscribed.set()

    def on_message(_c, _u, msg):
        r = json.loads(msg.payload)
        assert r["receipt"] == "vitaltrail/receipt/v1" and r["did"] == did
        with lock:
            for e in r["entries"]:
                m = pending.get(e["message_hash"])
                if m is None:
                    continue
                if e["status"] == "rejected":
                    summary["rejected"][e["reason"]] = summary["rejected"].get(e["reason"], 0) + 1
                    del pending[e["message_hash"]]
                    continue
                _, size, root = open_checkpoint(r["checkpoint"], key)
                t = e["log_time_ms"]
                leaf = blake3.blake3(b"\x00\x01" + t.to_bytes(8, "big") + m).digest()
                proof = [b64(p) for p in e["proof"]]
                if all(len(p) == 32 for p in proof) and verify_inclusion(
                    leaf, e["index"], size, proof, root
                ):
                    summary["verified"] += 1
                    if e["status"] == "duplicate":
                        summary["duplicates"] += 1
                    del pending[e["message_hash"]]
                else:
                    summary["bad"] += 1

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"py-{did[-12:]}", clean_session=False)
    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    if "ca" in opts:
        # Mutual TLS: the broker's CA, and this device's certificate and key.
        c.tls_set(ca_certs=opts["ca"], certfile=opts["cert"], keyfile=opts["key"])
    c.connect(host, port)
    c.loop_start()
    assert subscribed.wait(10), "no SUBACK"
    with lock:
        todo = list(pending.values())
    for m in todo:
        c.publish(f"vitals/{did}", m, qos=1).wait_for_publish(10)
    if "--resend-first" in flags and todo:
        time.sleep(1.0)
        # A resend of something already receipted: a duplicate receipt.
        h = base64.b64encode(blake3.blake3(todo[0]).digest()).decode()
        with lock:
            pending[h] = todo[0]
        c.publish(f"vitals/{did}", todo[0], qos=1).wait_for_publish(10)
    deadline = time.time() + 30
    last = time.time()
    while time.time() < deadline:
        with lock:
            left = list(pending.values())
        if not left:
            break
        if time.time() - last > 3:
            for m in left:
                c.publish(f"vitals/{did}", m, qos=1)
                summary["resent"] += 1
            last = time.time()
        time.sleep(0.05)
    c.loop_stop()
    c.disconnect()
    with lock:
        summary["unreceipted"] = len(pending)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
