// Opening a confidential run in the browser: the reader's X25519 key stays in this page's
// memory; the server sends only ciphertext, which is checked and opened here with libsodium,
// exactly as a consumer with no pond code does it (testdata/interop/pynacl_consumer.py):
// log streams are ENC2 (a signed key header, lines bound to run, stage, attempt and stream,
// a signed final record with the count and a running hash), artifacts are secretstream files
// with a signed `.pondkey` sidecar.

let sodiumReady = null;

/** libsodium, loaded on first use (the page fetches it only for confidential runs). */
export function sodium() {
  if (!sodiumReady) {
    sodiumReady = import("./libsodium-wrappers.mjs").then(async (m) => {
      const s = m.default;
      await s.ready;
      return s;
    });
  }
  return sodiumReady;
}

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: false });

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}
function equal(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}
function u32be(n) { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n); return b; }
function u64be(n) { const b = new Uint8Array(8); new DataView(b.buffer).setBigUint64(0, BigInt(n)); return b; }

/** The reader: a key loaded from a file or pasted (base64 of 32 bytes, as `pond` writes it). */
export class Reader {
  static async fromText(text) {
    const s = await sodium();
    let secret;
    try {
      secret = s.from_base64(text.trim(), s.base64_variants.ORIGINAL);
    } catch {
      throw new Error("the key is not base64 (a pond key file holds the base64 of 32 bytes)");
    }
    if (secret.length !== 32) throw new Error(`the key is ${secret.length} bytes, not 32`);
    const reader = new Reader();
    reader.s = s;
    reader.secret = secret;
    reader.public = s.crypto_scalarmult_base(secret);
    const digest = s.crypto_hash_sha256(reader.public);
    reader.fp8 = digest.slice(0, 8);
    reader.fingerprint = "SHA256:" + s.to_base64(digest, s.base64_variants.ORIGINAL_NO_PADDING);
    return reader;
  }
  /** Opens a sealed box addressed to this key. */
  unseal(sealed) { return this.s.crypto_box_seal_open(sealed, this.public, this.secret); }
  forget() { this.secret.fill(0); this.public.fill(0); }
}

/** The signing keys a run's output may be signed with: its nodes' and workers' keys, each
 *  counted only with the control plane's endorsement. */
export async function runSigners(api, runId) {
  const s = await sodium();
  const b64 = (t) => s.from_base64(t || "", s.base64_variants.ORIGINAL);
  const control = b64((await api("/v1/keys")).control_plane_key);
  const keys = await api(`/v1/runs/${encodeURIComponent(runId)}/keys`);
  const endorsed = (kind, ident, key, endorsement) => {
    try {
      const msg = concat(enc.encode(`pond.endorse.v1\0${kind}\0${ident}\0`), b64(key));
      return s.crypto_sign_verify_detached(b64(endorsement), msg, control);
    } catch { return false; }
  };
  const signers = [];
  for (const k of keys.control_plane || []) if (endorsed("node", k.node_id, k.signing_key, k.endorsement)) signers.push(b64(k.signing_key));
  for (const w of keys.workers || []) if (w.signing_key && endorsed("worker", w.id, w.signing_key, w.endorsement)) signers.push(b64(w.signing_key));
  return signers;
}

/** The attempts the transparency log says ended ("stage\0attempt"), read as the reference
 *  consumer does. */
export async function loggedAttempts(api, runId) {
  const head = await api("/v1/log/tree-head");
  if (!head.tree_size) return [];
  const log = await api(`/v1/runs/${encodeURIComponent(runId)}/log?tree_size=${head.tree_size}`);
  const out = [];
  for (const entry of log.entries || []) {
    const leaf = JSON.parse(entry.leaf);
    if (leaf.kind === "attempt" || leaf.kind === "attestation") out.push(`${leaf.stage}\0${leaf.attempt}`);
  }
  return out;
}

/** JSON with object keys sorted and no spaces: Python's `json.dumps(sort_keys=True,
 *  separators=(",", ":"), ensure_ascii=False)`, the form consumers sign. */
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object") {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

/** A recipient key as the API shows it: base64, or the `age1…` (bech32) form. */
function recipientBytes(s, text) {
  if (!text.startsWith("age1")) return s.from_base64(text, s.base64_variants.ORIGINAL);
  const charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
  const values = [...text.toLowerCase().slice(4)].map((c) => charset.indexOf(c)).slice(0, -6);
  let acc = 0, bits = 0;
  const out = [];
  for (const v of values) {
    if (v < 0) throw new Error("not bech32");
    acc = (acc << 5) | v; bits += 5;
    if (bits >= 8) { bits -= 8; out.push((acc >> bits) & 0xff); }
  }
  return new Uint8Array(out);
}

/** Checks the request kept with a confidential run against the reader's key, as the reference
 *  consumer does: signed by the key derived from this reader's (so, by this consumer), in
 *  canonical form, covering every recipient the run is sealed to and its project. Returns the
 *  problems (empty when it holds). */
export function checkRequest(reader, run) {
  const s = reader.s;
  const signed = run.encryption && run.encryption.request;
  if (!signed) return ["the run keeps no signed request: nothing shows who chose its recipients"];
  const problems = [];
  const seed = s.crypto_hash_sha256(concat(enc.encode("pond consumer signing key v1\0"), reader.secret));
  const mine = s.crypto_sign_seed_keypair(seed).publicKey;
  const theirs = s.from_base64(signed.signing_key, s.base64_variants.ORIGINAL);
  if (!equal(mine, theirs)) problems.push("the request was signed by another key than yours");
  let ok = false;
  try { ok = s.crypto_sign_verify_detached(s.from_base64(signed.signature, s.base64_variants.ORIGINAL), concat(enc.encode("pond-request-v1\0"), enc.encode(signed.body)), theirs); } catch { ok = false; }
  if (!ok) problems.push("the request's signature does not hold");
  let body = {};
  try { body = JSON.parse(signed.body); } catch { problems.push("the signed request is not JSON"); }
  if (canonical(body) !== signed.body) problems.push("the signed request is not in canonical form");
  if (body.project_id !== run.project_id) problems.push(`the request was signed for project ${body.project_id}, not ${run.project_id}`);
  const signedKeys = new Set((body.recipient_pubkeys || []).map((k) => { try { return s.to_base64(recipientBytes(s, k)); } catch { return ""; } }));
  for (const r of run.encryption.recipients || []) {
    let key = "";
    try { key = s.to_base64(recipientBytes(s, r)); } catch { /* counted below */ }
    if (!signedKeys.has(key)) problems.push(`recipient ${r.slice(0, 16)}… is not in the request you signed`);
  }
  return problems;
}

function place(runId, stage, attempt) {
  return concat(enc.encode(`${runId}\0${stage}\0`), u32be(attempt));
}

function signedByOne(s, signers, message, signature) {
  for (const key of signers) {
    try { if (s.crypto_sign_verify_detached(signature, message, key)) return key; } catch { /* next */ }
  }
  throw new Error("signed by none of the run's nodes or workers");
}

const STREAM_BYTE = { stdout: 1, stderr: 2 };

/** Opens one run's log lines in order. `line(l)` answers `{kind, text}`: `plain` (opened),
 *  `meta` (a header or final record, checked), `clear` (a system line pond wrote in clear),
 *  or `bad` (refused, with the reason). */
export class LogOpener {
  constructor(reader, runId, signers) {
    this.r = reader; this.s = reader.s; this.run = runId; this.signers = signers; this.streams = new Map();
  }
  line(l) {
    try { return this.open(l); } catch (e) { return { kind: "bad", text: `cannot open: ${e.message}` }; }
  }
  /** Wipes the stream keys this opener holds. */
  forget() {
    for (const st of this.streams.values()) st.key.fill(0);
    this.streams.clear();
  }
  /** What is missing from the run's log, as the CLI and the reference consumer check it once a
   *  run has ended: every attempt that ended has a whole stream (its signed final record read),
   *  every succeeded attempt has a stream, and so does every attempt the transparency log says
   *  ended (`logged`: "stage\0attempt" keys). Empty when the log is whole. */
  missing(run, logged) {
    const problems = [];
    const ended = new Set(["succeeded", "failed", "cancelled"]);
    for (const stage of run.stages) {
      for (const a of stage.attempts || []) {
        const st = this.streams.get(`${stage.key}\0${a.number}`);
        const at = `stage ${stage.key} attempt ${a.number}`;
        if (!st && a.outcome === "succeeded") problems.push(`${at}: its log is missing (a succeeded attempt always writes one)`);
        else if (st && ended.has(a.outcome) && !st.ended) problems.push(`${at}: its log is cut short (no signed final record)`);
      }
    }
    for (const key of logged) {
      const st = this.streams.get(key);
      if (!st || !st.ended) problems.push(`stage ${key.replace("\0", " attempt ")}: the transparency log says it ended, but its log is not whole`);
    }
    return [...new Set(problems)];
  }
  open(l) {
    const s = this.s, text = l.text, stage = l.stage || "", key = `${stage}\0${l.attempt}`;
    const where = place(this.run, stage, l.attempt);
    const b64 = (t) => s.from_base64(t, s.base64_variants.ORIGINAL);
    if (text.startsWith("ENC2K:")) {
      const [body64, sig64] = text.slice(6).split(" ");
      const body = b64(body64);
      const signer = signedByOne(s, this.signers, concat(enc.encode("pond.logkey.v2\0"), where, body), b64(sig64));
      if (this.streams.has(key)) throw new Error("two key headers for one stream");
      const n = body[16];
      for (let i = 0; i < n; i++) {
        const at = 17 + i * 88;
        if (equal(body.slice(at, at + 8), this.r.fp8)) {
          this.streams.set(key, { key: this.r.unseal(body.slice(at + 8, at + 88)), id: body.slice(0, 16), seq: 0,
            chain: new Uint8Array(32), signer, ended: false });
          return { kind: "meta", text: `stream of stage ${stage} attempt ${l.attempt}: key header signed and opened` };
        }
      }
      throw new Error("this key is not a recipient of the stream");
    }
    if (text.startsWith("ENC2:")) {
      const st = this.streams.get(key);
      if (!st) throw new Error("a sealed line before its stream's key header");
      if (st.ended) throw new Error("a line after the final record");
      const raw = b64(text.slice(5));
      const nonce = concat(st.id, u64be(st.seq));
      if (!equal(raw.slice(0, 24), nonce)) throw new Error("line out of order");
      const ad = concat(enc.encode("pond.logline.v2\0"), where, new Uint8Array([STREAM_BYTE[l.stream] || 0, l.continued ? 1 : 0]));
      const plain = s.crypto_aead_xchacha20poly1305_ietf_decrypt(null, raw.slice(24), ad, nonce, st.key);
      st.chain = s.crypto_hash_sha256(concat(st.chain, raw));
      st.seq += 1;
      return { kind: "plain", text: dec.decode(plain) };
    }
    if (text.startsWith("ENC2F:")) {
      const st = this.streams.get(key);
      if (!st) throw new Error("a final record before its stream's key header");
      const [body64, sig64] = text.slice(6).split(" ");
      const body = b64(body64);
      if (!s.crypto_sign_verify_detached(b64(sig64), concat(enc.encode("pond.logend.v2\0"), where, st.id, body), st.signer)) {
        throw new Error("the final record's signature does not hold");
      }
      const count = Number(new DataView(body.buffer, body.byteOffset, 8).getBigUint64(0));
      if (count !== st.seq) throw new Error(`the final record counts ${count} lines, ${st.seq} were read`);
      if (!equal(body.slice(8), st.chain)) throw new Error("the running hash differs from the final record's");
      st.ended = true;
      return { kind: "meta", text: `stream of stage ${stage} attempt ${l.attempt} is whole: ${count} line${count === 1 ? "" : "s"}, final record signed` };
    }
    if (text.startsWith("ENC1")) throw new Error("an older ENC1 line (bound to no place): use `pond run logs`");
    if (l.stream !== "system") throw new Error(`a clear-text ${l.stream} line in a confidential run`);
    return { kind: "clear", text };
  }
}

/** Opens a confidential artifact: `data` its bytes, `sidecar` its `.pondkey` JSON. */
export async function openArtifact(reader, runId, artifact, data, sidecar, signers) {
  const s = reader.s;
  const b64 = (t) => s.from_base64(t, s.base64_variants.ORIGINAL);
  if (sidecar.pondkey !== 2) throw new Error(`sidecar format ${sidecar.pondkey} is not 2`);
  const mine = (sidecar.recipients || []).find((r) => r.fp === reader.fingerprint);
  if (!mine) throw new Error(`not sealed to this key (${reader.fingerprint})`);
  const fileKey = reader.unseal(b64(mine.sealed_key));
  const where = place(runId, artifact.stage, artifact.attempt);
  const name = enc.encode(artifact.name);
  signedByOne(s, signers, concat(enc.encode("pond.artifact.v2\0"), where, name, new Uint8Array([0]), s.crypto_hash_sha256(data)),
    b64(sidecar.signature));
  const ad = concat(enc.encode("pond.artifact.v2\0"), where, name);
  if (data.length < 24) throw new Error("shorter than a stream header");
  const state = s.crypto_secretstream_xchacha20poly1305_init_pull(data.slice(0, 24), fileKey);
  const step = sidecar.chunk_size + 17;
  const parts = [];
  let at = 24, final = false;
  while (at < data.length) {
    if (final) throw new Error("bytes after the final chunk");
    const chunk = data.slice(at, at + step);
    at += chunk.length;
    const out = s.crypto_secretstream_xchacha20poly1305_pull(state, chunk, ad);
    if (!out) throw new Error("a chunk does not open (altered or reordered)");
    parts.push(out.message);
    final = out.tag === s.crypto_secretstream_xchacha20poly1305_TAG_FINAL;
  }
  if (!final) throw new Error("no final chunk: the file is cut short");
  return concat(...parts);
}
