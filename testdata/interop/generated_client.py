"""A consumer whose whole HTTP side is a client generated from docs/openapi.json by
openapi-python-client (no hand-written request): it submits a run, waits for it, reads its logs
and artifacts; then submits a confidential run (its request signed as FORMATS.md says) and opens
that run's log lines and artifact with PyNaCl.

usage: generated_client.py PACKAGE_PARENT SERVER TOKEN PROJECT CONSUMER_SK_HEX
  PACKAGE_PARENT holds the generated package `pond_client`.
prints JSON: {"plain": {"state", "lines", "artifact"}, "confidential": {"id", "state", "lines",
              "artifact", "sealed_on_the_wire"}}
"""
import base64
import hashlib
import json
import os
import struct
import sys
import time

package_parent, server, token, project, sk_hex = sys.argv[1:6]
sys.path.insert(0, package_parent)

from nacl.bindings import (  # noqa: E402
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_secretstream_xchacha20poly1305_init_pull,
    crypto_secretstream_xchacha20poly1305_pull,
    crypto_secretstream_xchacha20poly1305_state,
)
from nacl.public import PrivateKey, SealedBox  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from pond_client import AuthenticatedClient  # noqa: E402
from pond_client.api.runs import get_artifact, get_run, list_artifacts, run_logs, submit_run  # noqa: E402
from pond_client.models import LogPage, RunView, SubmitBody  # noqa: E402

client = AuthenticatedClient(base_url=server, token=token, raise_on_unexpected_status=True)
STAGE = {
    "key": "write",
    "executor": {
        "kind": "shell",
        "argv": ["sh", "-c", "echo hello from the generated client; printf 'artifact ✓' > \"$POND_OUTPUT_DIR/out.txt\""],
    },
}


def submit(request):
    answer = submit_run.sync_detailed(client=client, body=SubmitBody.from_dict(request))
    assert answer.status_code == 201, f"submit: {answer.status_code} {answer.content!r}"
    assert isinstance(answer.parsed, RunView), answer.parsed
    return str(answer.parsed.id)


def wait(run_id):
    deadline = time.time() + 60
    while True:
        run = get_run.sync(run_id, client=client)
        assert isinstance(run, RunView), run
        if run.state.value in ("succeeded", "failed", "cancelled"):
            return run
        assert time.time() < deadline, f"run {run_id} still {run.state.value}"
        time.sleep(0.1)


def logs(run_id):
    lines, after = [], 0
    while True:
        page = run_logs.sync(run_id, client=client, after=after, limit=1000)
        assert isinstance(page, LogPage), page
        if not page.lines:
            return lines
        lines.extend(page.lines)
        after = page.next_cursor


def artifact(run_id, name):
    answer = get_artifact.sync_detailed(run_id, name, client=client)
    assert answer.status_code == 200, f"artifact {name}: {answer.status_code}"
    assert hashlib.sha256(answer.content).hexdigest() == answer.headers["x-pond-sha256"]
    return answer.content


# A plain run.
plain_id = submit({"project_id": project, "definition": {"stages": [STAGE]}})
plain = wait(plain_id)
listed = list_artifacts.sync(plain_id, client=client).artifacts
plain_out = {
    "state": plain.state.value,
    "lines": [line.text for line in logs(plain_id) if line.stream.value == "stdout"],
    "artifacts": sorted(a.name for a in listed),
    "artifact": artifact(plain_id, "out.txt").decode(),
}

# A confidential run: this consumer is its recipient and signs its request.
secret = bytes.fromhex(sk_hex)
sk = PrivateKey(secret)
me = base64.b64encode(bytes(sk.public_key)).decode()
request = {
    "project_id": project,
    "definition": {"stages": [STAGE]},
    "encrypt": True,
    "recipient_pubkeys": [me],
    "nonce": os.urandom(16).hex(),
}
signed = {k: request.get(k, []) for k in ("definition", "nonce", "project_id", "recipient_pubkeys", "sources")}
canonical = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
signing = SigningKey(hashlib.sha256(b"pond consumer signing key v1\0" + secret).digest())
request["consumer_signature"] = {
    "signing_key": base64.b64encode(bytes(signing.verify_key)).decode(),
    "signature": base64.b64encode(signing.sign(b"pond-request-v1\0" + canonical.encode()).signature).decode(),
}
secret_id = submit(request)
confidential = wait(secret_id)
box = SealedBox(sk)


def place(stage, attempt):
    return secret_id.encode() + b"\0" + stage.encode() + b"\0" + struct.pack(">I", attempt)


# Log lines: the stream's key from its ENC2K header (sealed to this consumer), then each ENC2 line.
streams, opened, sealed_on_the_wire = {}, [], True
for line in logs(secret_id):
    text, where = line.text, place(line.stage or "", line.attempt)
    if text.startswith("ENC2K:"):
        body = base64.b64decode(text[6:].split(" ")[0])
        mine = hashlib.sha256(bytes(sk.public_key)).digest()[:8]
        for i in range(body[16]):
            at = 17 + i * 88
            if body[at:at + 8] == mine:
                streams[(line.stage, line.attempt)] = {"key": box.decrypt(body[at + 8:at + 88]), "id": body[:16], "seq": 0}
    elif text.startswith("ENC2:"):
        s = streams[(line.stage, line.attempt)]
        raw = base64.b64decode(text[5:])
        nonce = s["id"] + struct.pack(">Q", s["seq"])
        stream_byte = {"stdout": 1, "stderr": 2}[line.stream.value]
        ad = b"pond.logline.v2\0" + where + bytes([stream_byte, 1 if line.continued else 0])
        opened.append(crypto_aead_xchacha20poly1305_ietf_decrypt(raw[24:], ad, nonce, s["key"]).decode())
        s["seq"] += 1
    elif not text.startswith("ENC2F:") and line.stream.value != "system":
        sealed_on_the_wire = False

# The artifact: secretstream under a key sealed to this consumer in its `.pondkey` sidecar.
sealed = artifact(secret_id, "out.txt")
sidecar = json.loads(artifact(secret_id, "out.txt.pondkey"))
entry = next(r for r in sidecar["recipients"]
             if r["fp"] == "SHA256:" + base64.b64encode(hashlib.sha256(bytes(sk.public_key)).digest()).decode().rstrip("="))
file_key = box.decrypt(base64.b64decode(entry["sealed_key"]))
meta = next(a for a in list_artifacts.sync(secret_id, client=client).artifacts if a.name == "out.txt")
state = crypto_secretstream_xchacha20poly1305_state()
crypto_secretstream_xchacha20poly1305_init_pull(state, sealed[:24], file_key)
ad = b"pond.artifact.v2\0" + place(meta.stage, meta.attempt) + b"out.txt"
rest, plain_bytes, step = sealed[24:], b"", sidecar["chunk_size"] + 17
while rest:
    chunk, rest = rest[:step], rest[step:]
    plain_bytes += crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad)[0]
sealed_on_the_wire = sealed_on_the_wire and b"artifact" not in sealed

print(json.dumps({
    "plain": plain_out,
    "confidential": {
        "id": secret_id,
        "state": confidential.state.value,
        "lines": opened,
        "artifact": plain_bytes.decode(),
        "sealed_on_the_wire": sealed_on_the_wire,
    },
}))
