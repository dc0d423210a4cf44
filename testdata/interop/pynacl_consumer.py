"""A consumer written with PyNaCl (libsodium) and no Pond code: fetches a confidential run over
/v1, checks and decrypts its log streams (ENC2: signed headers and final records, each line bound
to its run, stage, attempt and stream) and artifacts (bound to place and name, sidecars signed),
checks its pooled stages' attestations, and checks the
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
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_secretstream_xchacha20poly1305_init_pull,
    crypto_secretstream_xchacha20poly1305_pull,
    crypto_secretstream_xchacha20poly1305_state,
    crypto_secretstream_xchacha20poly1305_TAG_FINAL,
)
from nacl.public import PrivateKey, SealedBox
from nacl.exceptions import BadSignatureError
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


def decode_key(text):
    """A recipient key: base64, or the age1... (bech32) form `pond keys show` prints."""
    if not text.startswith("age1"):
        return base64.b64decode(text)
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    values = [charset.index(c) for c in text.lower()[4:]][:-6]  # drop the checksum
    acc, bits, out = 0, 0, bytearray()
    for v in values:
        acc, bits = (acc << 5) | v, bits + 5
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
    return bytes(out)


def fingerprint(key):
    return "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")


run = json.loads(get(f"/v1/runs/{run_id}"))
keys = json.loads(get(f"/v1/runs/{run_id}/keys"))
# Node and worker keys count only with the control plane's endorsement (its key comes from the
# server key, which the database does not hold).
control = VerifyKey(base64.b64decode(json.loads(get("/v1/keys"))["control_plane_key"]))


def endorsed(kind, ident, key_b64, endorsement):
    try:
        control.verify(b"pond.endorse.v1\0" + kind.encode() + b"\0" + ident.encode() + b"\0" + base64.b64decode(key_b64),
                       base64.b64decode(endorsement or ""))
        return True
    except (BadSignatureError, ValueError):
        return False


signers = [VerifyKey(base64.b64decode(k["signing_key"])) for k in keys["control_plane"]
           if endorsed("node", k["node_id"], k["signing_key"], k.get("endorsement"))]
signers += [VerifyKey(base64.b64decode(w["signing_key"])) for w in keys["workers"]
            if w.get("signing_key") and endorsed("worker", w["id"], w["signing_key"], w.get("endorsement"))]


def place(stage, attempt):
    """What every ENC2 signature and associated data binds: run ‖ 0 ‖ stage ‖ 0 ‖ attempt."""
    return run_id.encode() + b"\0" + stage.encode() + b"\0" + struct.pack(">I", attempt)


def signed_by_one(message, signature):
    """The signer (a node's or a worker's key, from /v1/runs/{id}/keys) whose signature holds."""
    for key in signers:
        try:
            key.verify(message, signature)
            return key
        except BadSignatureError:
            pass
    raise AssertionError("signed by none of the run's nodes or workers")


# Log streams: one per (stage, attempt): an ENC2K header, ENC2 lines, an ENC2F final record.
STREAM_BYTE = {"stdout": 1, "stderr": 2}
streams, lines, after = {}, [], 0
while True:
    page = json.loads(get(f"/v1/runs/{run_id}/logs?after={after}&limit=1000"))
    if not page["lines"]:
        break
    after = page["next_cursor"]
    for line in page["lines"]:
        text, key = line["text"], (line.get("stage"), line["attempt"])
        where = place(line.get("stage") or "", line["attempt"])
        if text.startswith("ENC2K:"):
            body_b64, sig_b64 = text[6:].split(" ")
            body = base64.b64decode(body_b64)
            signer = signed_by_one(b"pond.logkey.v2\0" + where + body, base64.b64decode(sig_b64))
            n, mine = body[16], hashlib.sha256(pk).digest()[:8]
            assert key not in streams, "two key headers for one stream"
            for i in range(n):
                at = 17 + i * 88
                if body[at:at + 8] == mine:
                    streams[key] = {"key": box.decrypt(body[at + 8:at + 88]), "id": body[:16], "seq": 0,
                                    "chain": bytes(32), "signer": signer, "ended": False}
            assert key in streams, "not a recipient of this stream"
        elif text.startswith("ENC2:"):
            s = streams[key]
            assert not s["ended"], "a line after the final record"
            raw = base64.b64decode(text[5:])
            nonce = s["id"] + struct.pack(">Q", s["seq"])
            assert raw[:24] == nonce, "log line out of order"
            ad = b"pond.logline.v2\0" + where + bytes([STREAM_BYTE[line["stream"]], 1 if line.get("continued") else 0])
            plain = crypto_aead_xchacha20poly1305_ietf_decrypt(raw[24:], ad, nonce, s["key"])
            s["chain"] = hashlib.sha256(s["chain"] + raw).digest()
            s["seq"] += 1
            lines.append([line.get("stage"), plain.decode()])
        elif text.startswith("ENC2F:"):
            s = streams[key]
            body_b64, sig_b64 = text[6:].split(" ")
            body = base64.b64decode(body_b64)
            s["signer"].verify(b"pond.logend.v2\0" + where + s["id"] + body, base64.b64decode(sig_b64))
            count, chain = struct.unpack(">Q", body[:8])[0], body[8:]
            assert count == s["seq"], f"the final record counts {count} lines, {s['seq']} were read"
            assert chain == s["chain"], "the running hash differs from the final record's"
            s["ended"] = True
        else:
            # A confidential run's output is sealed, all of it: clear text there is not pond's.
            assert line["stream"] == "system", f"a clear-text {line['stream']} line in a confidential run"
            lines.append([line.get("stage"), text])

# Every attempt the transparency log says ended (a local attempt's end, a pooled attempt's
# attestation) has a whole stream, whatever the run view's labels say now.
head = json.loads(get("/v1/log/tree-head"))
if head["tree_size"] > 0:
    logged = json.loads(get(f"/v1/runs/{run_id}/log?tree_size={head['tree_size']}"))["entries"]
    for entry in logged:
        leaf = json.loads(entry["leaf"])
        if leaf["kind"] in ("attempt", "attestation"):
            s = streams.get((leaf["stage"], leaf["attempt"]))
            assert s and s["ended"], f"the log says stage {leaf['stage']} attempt {leaf['attempt']} ended; its stream is not whole"

# Every attempt that ended has a whole stream; every succeeded one has a stream.
for stage in run["stages"]:
    for attempt in stage["attempts"]:
        s = streams.get((stage["key"], attempt["number"]))
        if s is None:
            assert attempt.get("outcome") != "succeeded", f"stage {stage['key']}: the stream is missing"
        elif attempt.get("outcome") in ("succeeded", "failed", "cancelled"):
            assert s["ended"], f"stage {stage['key']}: the stream has no final record (cut short)"

# Artifacts: secretstream files with a .pondkey sidecar, bound to their place and name.
artifacts = {}
listing = json.loads(get(f"/v1/runs/{run_id}/artifacts"))["artifacts"]
names = {a["name"] for a in listing}
for entry_ in sorted(listing, key=lambda a: a["name"]):
    name = entry_["name"]
    if name.endswith(".pondkey"):
        continue
    assert name + ".pondkey" in names, f"artifact {name} of a confidential run has no key sidecar"
    sidecar = json.loads(get(f"/v1/runs/{run_id}/artifacts/{name}.pondkey"))
    assert sidecar["pondkey"] == 2, "an output artifact of this run is format 2"
    entry = next(r for r in sidecar["recipients"] if r["fp"] == fingerprint(pk))
    file_key = box.decrypt(base64.b64decode(entry["sealed_key"]))
    data = get(f"/v1/runs/{run_id}/artifacts/{name}")
    where = place(entry_["stage"], entry_["attempt"])
    signed_by_one(b"pond.artifact.v2\0" + where + name.encode() + b"\0" + hashlib.sha256(data).digest(),
                  base64.b64decode(sidecar["signature"]))
    ad = b"pond.artifact.v2\0" + where + name.encode()
    state = crypto_secretstream_xchacha20poly1305_state()
    crypto_secretstream_xchacha20poly1305_init_pull(state, data[:24], file_key)
    rest, out, step, final = data[24:], b"", sidecar["chunk_size"] + 17, False
    while rest:
        chunk, rest = rest[:step], rest[step:]
        msg, tag = crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad)
        out += msg
        if tag == crypto_secretstream_xchacha20poly1305_TAG_FINAL:
            final = True
            assert not rest, "bytes after the FINAL chunk"
    assert final, "no FINAL chunk"
    artifacts[name] = out.hex()

# Attestations of pooled stages (format (d)), checked against the worker's signing key.
attestations = []
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
signed_keys = {decode_key(k) for k in body["recipient_pubkeys"]}
request = {
    "signed_by_me": base64.b64decode(signed["signing_key"]) == bytes(my_signing_key),
    "canonical": json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == signed["body"],
    "covers_recipients": all(decode_key(r) in signed_keys for r in run["encryption"]["recipients"])
    and body["project_id"] == run["project_id"],
}

print(json.dumps({"lines": lines, "artifacts": artifacts, "attestations": attestations, "request": request}))
