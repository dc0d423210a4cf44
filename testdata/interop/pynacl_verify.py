"""`pond verify` written with PyNaCl and hashlib alone (no Pond code): checks a run against
Pond's transparency log, trusting the server for nothing it cannot prove.

usage: pynacl_verify.py SERVER TOKEN RUN_ID CONSUMER_SK_HEX STATE_FILE
  - the signed tree head verifies under a control-plane key (GET /v1/keys);
  - it extends the tree head kept in STATE_FILE from the last check (consistency proof, RFC 9162);
  - the run's leaves are in the tree (audit paths);
  - the run's request is signed by this consumer's key (derived from its X25519 secret), covers
    the run's recipients, and its leaf is in the log;
  - every attestation's signature holds under its worker's key and its leaf is in the log.
Then STATE_FILE keeps the new tree head. Prints JSON {"tree_size": N, "checks": [...]}; exits 1
naming the first check that failed.
"""
import base64
import hashlib
import json
import struct
import sys
import urllib.request

from nacl.signing import SigningKey, VerifyKey

server, token, run_id, sk_hex, state_file = sys.argv[1:6]
b64 = base64.b64decode


def get(path):
    req = urllib.request.Request(server + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


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


def canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def leaf_hash(leaf):
    return hashlib.sha256(b"\0" + leaf.encode()).digest()


def node(left, right):
    return hashlib.sha256(b"\1" + left + right).digest()


def verify_inclusion(leaf, index, size, proof, root):
    """RFC 9162 section 2.1.3.2."""
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


def verify_consistency(m, n, old_root, new_root, proof):
    """RFC 9162 section 2.1.4.2."""
    if m == 0 or m > n:
        return False
    if m == n:
        return not proof and old_root == new_root
    path = list(proof)
    if m & (m - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


checks = []
# 1. The tree head, signed by the control plane's key (derived from the server key, which the
#    database does not hold; the same key endorses every node and worker key).
control_key = get("/v1/keys")["control_plane_key"]
control = VerifyKey(b64(control_key))
head = get("/v1/log/tree-head")
assert head["signing_key"] == control_key, "the tree head is not signed by the control plane's key"
size, root = head["tree_size"], b64(head["root_hash"])
VerifyKey(b64(head["signing_key"])).verify(
    b"pond.treehead.v1\0" + struct.pack(">Q", size) + root + struct.pack(">q", head["timestamp"]),
    b64(head["signature"]))
checks.append(f"tree head of {size} leaves signed by {head['node_id']}")

# 2. It extends the head seen last time.
try:
    with open(state_file) as f:
        old = json.load(f)
except FileNotFoundError:
    old = None
if old is not None:
    assert size >= old["tree_size"], "the log shrank: its history was rewritten"
    proof = [] if size == old["tree_size"] else [
        b64(h) for h in get(f"/v1/log/consistency?first={old['tree_size']}&second={size}")["proof"]]
    assert verify_consistency(old["tree_size"], size, b64(old["root_hash"]), root, proof), \
        "the log does not extend the tree head seen before: its history was rewritten"
    checks.append(f"extends the tree head of {old['tree_size']} leaves")

# 3. The run's leaves are in the tree.
logged = get(f"/v1/runs/{run_id}/log?tree_size={size}")["entries"]
for e in logged:
    assert verify_inclusion(leaf_hash(e["leaf"]), e["index"], size, [b64(p) for p in e["proof"]], root), \
        f"leaf {e['index']} is not in the tree"
leaves = {e["leaf"] for e in logged}
checks.append(f"{len(logged)} leaves in the tree")

# 4. The request: this consumer's key, its recipients, in the log.
run = get(f"/v1/runs/{run_id}")
assert run.get("encryption"), "the run shows no encryption (this consumer signed it encrypted: it was stripped)"
request = run["encryption"]["request"]
mine = SigningKey(hashlib.sha256(b"pond consumer signing key v1\0" + bytes.fromhex(sk_hex)).digest()).verify_key
assert b64(request["signing_key"]) == bytes(mine), "the request is not signed by this consumer's key"
mine.verify(b"pond-request-v1\0" + request["body"].encode(), b64(request["signature"]))
body = json.loads(request["body"])
signed = {decode_key(k) for k in body["recipient_pubkeys"]}
assert body["project_id"] == run["project_id"], "signed for another project"
shown = {decode_key(r) for r in run["encryption"]["recipients"]}
assert shown == signed, "the run's recipients are not the ones signed for"
assert canonical({"kind": "request", "run": run_id, "project": run["project_id"], "signing_key": request["signing_key"],
                  "signature": request["signature"], "body": request["body"]}) in leaves, "the request is not in the log"
checks.append("request signed by this consumer, in the log")

# 5. Attestations: verified by pond, signed under their worker's pinned key, in the log.
workers = get(f"/v1/runs/{run_id}/keys")["workers"]
for stage in run["stages"]:
    for attempt in stage["attempts"]:
        a = attempt.get("attestation")
        if not a:
            continue
        job = a["job_id"].encode()
        msg = (b"pond.attest.v1\0" + struct.pack(">I", len(job)) + job + bytes.fromhex(a["input_sha256"])
               + bytes.fromhex(a["output_sha256"]) + struct.pack(">q", a["rc"]))
        assert a["verified"], f"pond did not verify the attestation of {stage['key']}"
        worker = next(w for w in workers if w["id"] == a["worker"])
        pinned = worker["signing_key"]
        control.verify(b"pond.endorse.v1\0worker\0" + worker["id"].encode() + b"\0" + b64(pinned),
                       b64(worker.get("endorsement") or ""))
        assert a["signing_key"] == pinned, "the attestation names another key than its worker's pinned one"
        VerifyKey(b64(pinned)).verify(msg, b64(a["signature"]))
        leaf = canonical({"kind": "attestation", "run": run_id, "stage": stage["key"], "attempt": attempt["number"],
                          "worker": a["worker"], "signing_key": a.get("signing_key"), "job_id": a["job_id"],
                          "input_sha256": a["input_sha256"], "output_sha256": a.get("output_sha256"), "rc": a["rc"],
                          "signature": a["signature"], "verified": a["verified"]})
        assert leaf in leaves, f"the attestation of {stage['key']} is not in the log"
        checks.append(f"attestation of {stage['key']} signed by its worker, in the log")

with open(state_file, "w") as f:
    json.dump({"tree_size": size, "root_hash": head["root_hash"]}, f)
print(json.dumps({"tree_size": size, "checks": checks}))
