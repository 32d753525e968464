"""A nurse station acknowledging an alarm over HTTP with urllib: a client
independent of vitaltrail's own.

usage: ack_client.py BASE_URL ALARM_ID TOKEN_FILE [BODY] [ORIGIN]

POSTs BASE_URL/alerts/<ALARM_ID>/ack with "Authorization: Bearer <the
token in TOKEN_FILE>" (TOKEN_FILE "-": none) and BODY (default empty). The
ID is percent-encoded, its '/'s too, unless it starts with "raw:" (then
sent with its '/'s as they are). ORIGIN, if given, is sent as the Origin
header. Prints one JSON object: {"status": <HTTP status>, "body": <the
answer, parsed>}.
"""
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


def main():
    base, alarm, token_file = sys.argv[1:4]
    body = sys.argv[4] if len(sys.argv) > 4 else ""
    origin = sys.argv[5] if len(sys.argv) > 5 else None
    if alarm.startswith("raw:"):
        path = urllib.parse.quote(alarm[4:], safe="/")
    else:
        path = urllib.parse.quote(alarm, safe="")
    req = urllib.request.Request(
        base.rstrip("/") + "/alerts/" + path + "/ack", data=body.encode(), method="POST"
    )
    if token_file != "-":
        with open(token_file) as f:
            req.add_header("Authorization", "Bearer " + f.read().strip())
    if body:
        req.add_header("Content-Type", "application/json")
    if origin:
        req.add_header("Origin", origin)
    # No proxy: the engine is on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    print(json.dumps({"status": status, "body": json.loads(text)}))


if __name__ == "__main__":
    main()
