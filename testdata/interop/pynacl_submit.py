"""A consumer that submits a confidential run with PyNaCl and the standard library alone (no Pond
code): it derives its Ed25519 signing key from its X25519 secret, signs the request's canonical
JSON, and posts it. Prints the run id.

usage: pynacl_submit.py SERVER TOKEN PROJECT CONSUMER_SK_HEX REQUEST_JSON_FILE
  REQUEST_JSON_FILE holds {"definition": ..., "sources": [...]} (optional "recipient_pubkeys":
  more readers); this consumer's own public key is added as the first recipient.
"""
import base64
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

from nacl.public import PrivateKey
from nacl.signing import SigningKey

server, token, project, sk_hex, request_file = sys.argv[1:6]
secret = bytes.fromhex(sk_hex)
with open(request_file) as f:
    request = json.load(f)

me = base64.b64encode(bytes(PrivateKey(secret).public_key)).decode()
request["project_id"] = project
request["encrypt"] = True
request["recipient_pubkeys"] = [me] + request.get("recipient_pubkeys", [])

# What is signed: five fields as sent (nonce "" and sources, recipients [] when absent), canonical JSON.
request["nonce"] = os.urandom(16).hex()  # each request its own signature
signed = {
    "definition": request["definition"],
    "nonce": request["nonce"],
    "project_id": project,
    "recipient_pubkeys": request["recipient_pubkeys"],
    "sources": request.get("sources", []),
}
canonical = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
key = SigningKey(hashlib.sha256(b"pond consumer signing key v1\0" + secret).digest())
signature = key.sign(b"pond-request-v1\0" + canonical.encode()).signature
request["consumer_signature"] = {
    "signing_key": base64.b64encode(bytes(key.verify_key)).decode(),
    "signature": base64.b64encode(signature).decode(),
}

req = urllib.request.Request(
    server + "/v1/runs",
    data=json.dumps(request).encode(),
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    method="POST",
)
try:
    with urllib.request.urlopen(req) as r:
        print(json.loads(r.read())["id"])
except urllib.error.HTTPError as e:
    sys.exit(f"submit refused: {e.code} {e.read().decode()}")
