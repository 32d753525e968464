"""A webhook receiver built from docs/alerts.md alone (Python standard
library): it checks each POST's HMAC-SHA256 signature over the body, that
the body is a FHIR Communication whose event key is the Idempotency-Key,
refuses well-signed attempts with 503 while the file CLOSED exists (a
receiver that is down), and appends what it takes to a file, one JSON line
per request, fsynced before it answers 204.

Usage: webhook_receiver.py SECRET_FILE OUT_FILE PORT_FILE CLOSED

It writes its port to PORT_FILE once listening. Lines of OUT_FILE:
  {"took": true, "key": ..., "kind": ..., "alarm": ..., "body": {...}}
  {"took": false, "why": "refused"|"bad signature"|"bad body"}
"""

import hashlib
import hmac
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ALARM = "urn:vitaltrail:alarm"
EVENT = "urn:vitaltrail:alarm-event"


def main():
    secret_file, out_file, port_file, closed = sys.argv[1:5]
    with open(secret_file, "rb") as f:
        secret = f.read().strip()
    lock = threading.Lock()
    out = open(out_file, "a", encoding="utf-8")

    def record(obj):
        with lock:
            out.write(json.dumps(obj) + "\n")
            out.flush()
            os.fsync(out.fileno())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, code):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(n)
            want = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            got = self.headers.get("X-Vitaltrail-Signature", "")
            if not hmac.compare_digest(want, got):
                record({"took": False, "why": "bad signature"})
                return self.answer(401)
            try:
                c = json.loads(body)
                assert c["resourceType"] == "Communication"
                ids = {i["system"]: i["value"] for i in c["identifier"]}
                key = ids[EVENT]
                # The header is the key percent-encoded (docs/alerts.md).
                assert key == urllib.parse.unquote(self.headers.get("Idempotency-Key"))
                assert self.headers.get("Content-Type") == "application/fhir+json"
                kind = c["category"][0]["coding"][0]["code"]
                assert kind == self.headers.get("X-Vitaltrail-Event")
            except Exception as e:  # noqa: BLE001 - any malformed body
                record({"took": False, "why": "bad body: %r" % (e,)})
                return self.answer(400)
            if os.path.exists(closed):
                record({"took": False, "why": "refused"})
                return self.answer(503)
            record({"took": True, "key": key, "kind": kind, "alarm": ids[ALARM], "body": c})
            self.answer(204)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(tmp, port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
