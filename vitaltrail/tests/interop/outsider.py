"""A hostile MQTT client, for the broker-authentication tests.

It tries, each on a fresh connection, everything docs/threat-model.md says
a client must not be able to do, and prints one JSON object: per attempt,
whether the broker accepted the connection (a CONNACK with code 0), how
many messages it received, and whether the broker closed the connection.

usage: outsider.py HOST PORT --ca=CA --cert=CERT --key=KEY
                   --revoked-cert=C --revoked-key=K --victim=DID
                   --own=DID --pipeline-id=ID --share-group=G
                   [--listen-seconds=S]

CERT/KEY are a registered, active device's (an insider gone bad); the
revoked pair is a device that was revoked after it got its certificate.
"""
import datetime
import json
import os
import ssl
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID


def foreign_identity(dirname):
    """A self-made CA's device certificate: right shape, wrong issuer."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "did:key:z6MkForeign")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    c, k = os.path.join(dirname, "foreign.pem"), os.path.join(dirname, "foreign.key")
    open(c, "wb").write(cert.public_bytes(serialization.Encoding.PEM))
    open(k, "wb").write(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


OWN = [None]  # the insider's DID: what comes on its own receipts topic is its own


def attempt(host, port, client_id, tls, subscribe=None, publish=None, listen=2.0, until_own=False):
    """One connection: connect, maybe subscribe or publish, listen.
    `received` counts what is not the insider's own (its own receipts,
    which its session may be subscribed to by a wildcard, are `own`).
    `until_own`: stop listening as soon as one of its own arrives (the
    control), so a slow pipeline gets the whole `listen` to answer; like a
    device, it publishes again every 2 s until then (rejection receipts are
    best-effort: a full receipt queue drops them, and the device resends)."""
    out = {"connected": False, "received": 0, "own": 0, "closed": False, "suback_refused": False}
    connected = threading.Event()
    listening = [True]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.reconnect_delay_set(30, 30)  # one try per attempt

    def on_connect(_c, _u, _f, rc, _p=None):
        if not rc.is_failure:
            out["connected"] = True
        connected.set()

    def on_disconnect(*_a):
        # Only the broker's doing counts, not our own disconnect at the end.
        if listening[0]:
            out["closed"] = True
        connected.set()

    def on_message(_c, _u, msg):
        if OWN[0] and msg.topic == f"receipts/{OWN[0]}":
            out["own"] += 1
        else:
            out["received"] += 1

    def on_subscribe(_c, _u, _mid, codes, _p=None):
        if any(getattr(rc, "is_failure", False) or rc == 128 for rc in codes):
            out["suback_refused"] = True

    c.on_connect, c.on_disconnect = on_connect, on_disconnect
    c.on_message, c.on_subscribe = on_message, on_subscribe
    if tls is not None:
        ca, cert, key = tls
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
        c.tls_set_context(ctx)
    try:
        c.connect(host, port, keepalive=10)
    except Exception as e:  # TLS refused during the handshake
        out["error"] = type(e).__name__
        return out
    c.loop_start()
    connected.wait(3)
    if out["connected"]:
        if subscribe:
            c.subscribe(subscribe, qos=1)
        if publish:
            c.publish(publish[0], publish[1], qos=publish[2] if len(publish) > 2 else 1)
        start = time.monotonic()
        deadline, sent = start + listen, 1
        while time.monotonic() < deadline and not (until_own and out["own"] >= 1):
            time.sleep(0.05)
            if until_own and publish and time.monotonic() - start >= 2.0 * sent:
                c.publish(publish[0], publish[1], qos=publish[2] if len(publish) > 2 else 1)
                sent += 1
        if until_own:
            out["sent"] = sent
    listening[0] = False
    c.loop_stop()
    try:
        c.disconnect()
    except Exception:
        pass
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    o = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    host, port = args[0], int(args[1])
    listen = float(o.get("listen-seconds", "2"))
    insider = (o["ca"], o["cert"], o["key"])
    victim, group, own = o["victim"], o["share-group"], o["own"]
    OWN[0] = own
    r = {}
    with tempfile.TemporaryDirectory() as d:
        fc, fk = foreign_identity(d)
        r["plain_tcp"] = attempt(host, port, "outsider-plain", None, "vitals/#", listen=listen)
        r["tls_without_certificate"] = attempt(host, port, "outsider-nocert", (o["ca"], None, None), "vitals/#", listen=listen)
        r["foreign_certificate"] = attempt(host, port, "outsider-foreign", (o["ca"], fc, fk), "vitals/#", listen=listen)
    r["revoked_device"] = attempt(host, port, "outsider-revoked", (o["ca"], o["revoked-cert"], o["revoked-key"]), "vitals/#", listen=listen)
    for name, f in [
        ("subscribe_all_vitals", "vitals/#"),
        ("subscribe_victim_vitals", f"vitals/{victim}"),
        ("join_ingest_share_group", f"$share/{group}/vitals/#"),
        ("subscribe_all_receipts", "receipts/#"),
        ("subscribe_victim_receipts", f"receipts/{victim}"),
        ("subscribe_everything", "#"),
    ]:
        r[name] = attempt(host, port, f"outsider-{name}", insider, f, listen=listen)
    r["forge_victim_receipt"] = attempt(
        host, port, "outsider-forge-receipt", insider, None, (f"receipts/{victim}", b'{"receipt":"forged"}'), listen=listen
    )
    r["publish_below_own_topic"] = attempt(
        host, port, "outsider-subtopic", insider, None, (f"vitals/{own}/" + "x" * 1000, b"junk"), listen=listen
    )
    r["publish_qos2"] = attempt(
        host, port, "outsider-qos2", insider, None, (f"vitals/{own}", b"junk", 2), listen=listen
    )
    r["publish_as_victim"] = attempt(
        host, port, "outsider-forge", insider, None, (f"vitals/{victim}", b"outsider-forged-\xa5" * 4), listen=listen
    )
    # Take over the pipeline's client ID with a persistent session, and
    # listen on every topic it might be handed.
    r["take_over_pipeline_client_id"] = attempt(host, port, o["pipeline-id"], insider, "vitals/#", listen=listen)
    # Last (Mosquitto keeps one session per device, and later attempts would
    # inherit its subscription), the control: the insider's own topics work (a junk message on its own
    # topic comes back as a rejection receipt), so "received 0" elsewhere
    # is the broker's refusal, not a broken client.
    r["control_own_topics"] = attempt(
        host, port, "outsider-own", insider, f"receipts/{own}", (f"vitals/{own}", b"outsider-own-junk"), listen=30.0, until_own=True
    )
    print(json.dumps(r))


if __name__ == "__main__":
    main()
