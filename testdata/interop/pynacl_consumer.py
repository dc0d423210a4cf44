"""A consumer written with PyNaCl (libsodium) and no Pond code: fetches a confidential run over
/v1, decrypts its log lines and artifacts, checks its pooled stages' attestations, and checks the
signed request kept with the run: signed by this consumer's key, in canonical form, covering
every recipient.

usage: pynacl_consumer.py SERVER TOKEN RUN_ID CONSUMER_SK_HEX [WORKER_SIGNING_PK_B64]
prints JSON: {"lines": [[stage, text], ...], "artifacts": {name: hex}, "attestations": [bool, ...],
              "request": {"signed_by_me": bool, "canonical": bool, "covers_recipients": bool}}
"""
import base64
import hashlib
import json
import struct
import sys
import urllib.request

from nacl.bindings import (
    crypto_secretstream_xchacha20poly1305_init_pull,
    crypto_secretstream_xchacha20poly1305_pull,
    crypto_secretstream_xchacha20poly1305_state,
    crypto_secretstream_xchacha20poly1305_TAG_FINAL,
)
from nacl.public import PrivateKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

server, token, run_id, sk_hex = sys.argv[1:5]
signing_pk = base64.b64decode(sys.argv[5]) if len(sys.argv) > 5 else None
sk = PrivateKey(bytes.fromhex(sk_hex))
pk = bytes(sk.public_key)
box = SealedBox(sk)


def get(path):
    req = urllib.request.Request(server + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req) as r:
        return r.read()


def fingerprint(key):
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


# Log lines: one stream per (stage, attempt), opened by its ENC1K header.
streams, lines, after = {}, [], 0
while True:
    page = json.loads(get(f"/v1/runs/{run_id}/logs?after={after}&limit=1000"))
    if not page["lines"]:
        break
    after = page["next_cursor"]
    for line in page["lines"]:
        text, key = line["text"], (line.get("stage"), line["attempt"])
        if text.startswith("ENC1K:"):
            body_b64, sig_b64 = text[6:].split(" ")
            body = base64.b64decode(body_b64)
            n, mine = body[16], hashlib.sha256(pk).digest()[:8]
            for i in range(n):
                at = 17 + i * 88
                if body[at:at + 8] == mine:
                    streams[key] = (SecretBox(box.decrypt(body[at + 8:at + 88])), body[:16], 0)
            assert key in streams, "not a recipient of this stream"
        elif text.startswith("ENC1:"):
            secret, stream_id, seq = streams[key]
            raw = base64.b64decode(text[5:])
            assert raw[:24] == stream_id + struct.pack(">Q", seq), "log line out of order"
            lines.append([line.get("stage"), secret.decrypt(raw).decode()])
            streams[key] = (secret, stream_id, seq + 1)
        else:
            lines.append([line.get("stage"), text])

# Artifacts: secretstream files with a .pondkey sidecar.
artifacts = {}
listing = json.loads(get(f"/v1/runs/{run_id}/artifacts"))["artifacts"]
names = {a["name"] for a in listing}
for name in sorted(names):
    if name.endswith(".pondkey") or name + ".pondkey" not in names:
        continue
    sidecar = json.loads(get(f"/v1/runs/{run_id}/artifacts/{name}.pondkey"))
    entry = next(r for r in sidecar["recipients"] if r["fp"] == fingerprint(pk))
    file_key = box.decrypt(base64.b64decode(entry["sealed_key"]))
    data = get(f"/v1/runs/{run_id}/artifacts/{name}")
    state = crypto_secretstream_xchacha20poly1305_state()
    crypto_secretstream_xchacha20poly1305_init_pull(state, data[:24], file_key)
    rest, out, step, final = data[24:], b"", sidecar["chunk_size"] + 17, False
    while rest:
        chunk, rest = rest[:step], rest[step:]
        msg, tag = crypto_secretstream_xchacha20poly1305_pull(state, chunk, None)
        out += msg
        if tag == crypto_secretstream_xchacha20poly1305_TAG_FINAL:
            final = True
            assert not rest, "bytes after the FINAL chunk"
    assert final, "no FINAL chunk"
    artifacts[name] = out.hex()

# Attestations of pooled stages (format (d)), checked against the worker's signing key.
attestations = []
run = json.loads(get(f"/v1/runs/{run_id}"))
for stage in run["stages"]:
    for attempt in stage["attempts"]:
        a = attempt.get("attestation")
        if not a or signing_pk is None:
            continue
        job = a["job_id"].encode()
        msg = (b"pond.attest.v1\0" + struct.pack(">I", len(job)) + job + bytes.fromhex(a["input_sha256"])
               + bytes.fromhex(a["output_sha256"]) + struct.pack(">q", a["rc"]))
        VerifyKey(signing_pk).verify(msg, base64.b64decode(a["signature"]))
        # The signed manifest is over what pond stores for the stage (ciphertext and sidecars):
        # recomputed here from the listing, and each listed digest from the bytes served.
        mine = sorted((x for x in listing if x["stage"] == stage["key"]), key=lambda x: x["name"])
        manifest = hashlib.sha256()
        for x in mine:
            assert hashlib.sha256(get(f"/v1/runs/{run_id}/artifacts/{x['name']}")).hexdigest() == x["sha256"]
            manifest.update(x["name"].encode() + b"\0" + x["sha256"].encode() + b"\n")
        assert manifest.hexdigest() == a["output_sha256"], "the signed manifest is not what pond stores"
        attestations.append(True)

# The request this consumer signed (FORMATS.md "Signed requests"): its Ed25519 key is derived
# from the X25519 secret; the signature is over a context string and the canonical JSON.
signed = run["encryption"]["request"]
my_signing_key = SigningKey(hashlib.sha256(b"pond consumer signing key v1\0" + bytes(sk)).digest()).verify_key
VerifyKey(base64.b64decode(signed["signing_key"])).verify(
    b"pond-request-v1\0" + signed["body"].encode(), base64.b64decode(signed["signature"]))
body = json.loads(signed["body"])
signed_keys = {base64.b64decode(k) for k in body["recipient_pubkeys"]}
request = {
    "signed_by_me": base64.b64decode(signed["signing_key"]) == bytes(my_signing_key),
    "canonical": json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == signed["body"],
    "covers_recipients": all(base64.b64decode(r) in signed_keys for r in run["encryption"]["recipients"])
    and body["project_id"] == run["project_id"],
}

print(json.dumps({"lines": lines, "artifacts": artifacts, "attestations": attestations, "request": request}))
