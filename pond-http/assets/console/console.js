// The Pond console: a client of the /v1 API, like the CLI. Every value from the server is put
// on the page as text (textContent, never HTML), so a log line or a stage key cannot become
// markup. The API key lives in this tab's sessionStorage and travels only in the
// Authorization header; a confidential run's reader key lives in this module's memory only.

const TOKEN = "pond.token";
const $main = document.getElementById("main");
const terminal = new Set(["succeeded", "failed", "cancelled"]);
let me = null;          // GET /v1/whoami
let reader = null;      // open.js Reader, when a key is loaded
let leave = [];         // what the current view must stop when another opens

// ---------- the page's building blocks ----------

/** An element: `h("a", {href}, "text", child)`. Strings become text nodes. */
function h(tag, attrs, ...children) {
  const el = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    // Handlers are the code's own functions, never text; links and images point only into the
    // page (`#…`) or at blobs it made — whatever a server value holds.
    if (k.startsWith("on")) { if (typeof v === "function") el.addEventListener(k.slice(2), v); continue; }
    if ((k === "href" || k === "src") && !/^(#|blob:|\/console\/)/.test(String(v))) continue;
    if (k === "class") el.setAttribute("class", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const svg = (tag, attrs, ...c) => h("svg:" + tag, attrs, ...c);

/** Replaces `el`'s children with `nodes`, skipping the absent ones (`cond ? node : null`). */
function fill(el, ...nodes) {
  el.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false)
    .map((n) => (n instanceof Node ? n : document.createTextNode(String(n)))));
}
let views = 0;          // counts rendered views: a slow view's late answer must not paint over a newer one
/** A painter of the main area for the view being rendered now: it paints nothing once another
 *  view has started. */
function screen() {
  const id = views;
  const paint = (...nodes) => { if (id === views) fill($main, ...nodes); };
  paint.current = () => id === views;
  return paint;
}
function alertBox(message) {
  const box = document.getElementById("alert");
  box.textContent = message || "";
  box.hidden = !message;
}
function badge(state) {
  return h("span", { class: `badge s-${state}` }, state);
}
function when(t) {
  return t ? new Date(t).toLocaleString() : "—";
}
function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round((Date.now() - new Date(t)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}
function span(a, b) {
  if (!a) return "—";
  const ms = (b ? new Date(b) : new Date()) - new Date(a);
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 60000)} min`;
}
function table(headers, rows, caption) {
  return h("table", {},
    caption ? h("caption", { class: "sr" }, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x || h("span", { class: "sr" }, "Actions"))))),
    h("tbody", {}, rows));
}
function field(label, control) {
  return h("label", {}, label, control);
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** A call to the API with the session's key; JSON in, JSON (or bytes) out. */
async function api(path, { method = "GET", body, bytes = false, signal } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      const e = (await res.json()).error;
      message = e.field ? `${e.field}: ${e.reason || e.message}` : e.message || message;
    } catch { /* not JSON */ }
    if (res.status === 401 && path !== "/v1/whoami") {
      signOut("The key was refused (revoked or unknown): sign in again.");
    }
    throw new ApiError(res.status, message);
  }
  if (bytes) return new Uint8Array(await res.arrayBuffer());
  return res.status === 204 ? null : res.json();
}

/** Reads a server-sent event stream with the session's key (EventSource cannot send one),
 *  reconnecting after a drop from the last id seen. Stops when `signal` aborts. */
async function follow(path, onEvent, signal, onState = () => {}) {
  let last = null;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN) || ""}`, Accept: "text/event-stream" };
      if (last !== null) headers["Last-Event-ID"] = last;
      const res = await fetch(path, { headers, signal });
      if (res.status === 401) { signOut("The key was refused (revoked or unknown): sign in again."); return; }
      if (res.status >= 400 && res.status < 500 && res.status !== 429) {
        let message = `${res.status}`;
        try { message = (await res.json()).error.message; } catch { /* not JSON */ }
        alertBox(`Live updates stopped: ${message}`);
        onState(false);
        return;
      }
      if (!res.ok) throw new Error(`${res.status}`);
      onState(true);
      const reader = res.body.getReader();
      const text = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += text.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          const ev = { event: "message", data: [], id: null };
          for (const line of block.split(/\r?\n/)) {
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const name = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (name === "event") ev.event = value;
            else if (name === "data") ev.data.push(value);
            else if (name === "id") ev.id = value;
          }
          if (ev.id !== null) last = ev.id;
          if (ev.data.length === 0 && ev.event === "message") continue;
          if (onEvent({ event: ev.event, data: ev.data.join("\n"), id: ev.id }) === false) return;
        }
      }
    } catch (e) {
      if (signal.aborted) return;
    }
    onState(false);
    await new Promise((r) => setTimeout(r, 1500));
  }
}

// ---------- session ----------

function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  me = null;
  if (reader) { reader.forget(); reader = null; }
  location.hash = "#/signin";
  render().then(() => alertBox(message));
}

function navigation() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const here = (location.hash.split("?")[0].split("/")[1] || "runs");
  const links = me ? [["runs", "Runs"]] : [];
  if (me && me.role === "admin") links.push(["pools", "Pools"], ["agents", "Agents"], ["keys", "Keys"]);
  fill(nav, ...links.map(([id, label]) =>
    h("a", { href: `#/${id}`, "aria-current": here === id ? "page" : null }, label)));
  fill(who, ...(me
    ? [h("span", {}, `${me.role} key ${String(me.key_id).slice(0, 12)}…${me.projects.length ? " · " + me.projects.join(", ") : ""}`),
      h("button", { type: "button", onclick: () => signOut("Signed out.") }, "Sign out")]
    : []));
}

function signInView(message) {
  const show = screen();
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", required: true, spellcheck: "false" });
  const form = h("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(TOKEN, input.value.trim());
      try {
        me = await api("/v1/whoami");
        alertBox("");
        if (location.hash === "#/runs") render(); else location.hash = "#/runs";
      } catch (err) {
        sessionStorage.removeItem(TOKEN);
        alertBox(err.status === 401 ? "That key was refused: check it, or ask an admin for a new one." : `Sign-in failed: ${err.message}`);
      }
    },
  },
  h("label", { for: "token" }, "API key (admin or consumer)", input),
  h("button", { class: "primary", type: "submit" }, "Sign in"),
  h("p", { class: "note" }, "The key stays in this tab (session storage) and is sent only in the Authorization header to this server. ",
    "An admin makes one with ", h("code", {}, "pond admin keys create --project <name>"), "."));
  show(h("section", { class: "signin" }, h("h1", {}, "Sign in to Pond"), message ? h("p", {}, message) : null, form));
  input.focus();
}

// ---------- runs ----------

function query() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

async function runsView() {
  const show = screen();
  const q = query();
  const filters = { project: q.get("project") || "", state: q.get("state") || "", text: q.get("text") || "" };
  const cursors = (q.get("page") || "").split(",").filter(Boolean);
  const project = me.role === "admin"
    ? h("input", { name: "project", value: filters.project, placeholder: "any", size: 14 })
    : h("select", { name: "project" }, h("option", { value: "" }, "all of mine"),
      me.projects.map((p) => h("option", { value: p, selected: p === filters.project }, p)));
  const state = h("select", { name: "state" }, ["", "queued", "running", "succeeded", "failed", "cancelled"]
    .map((s) => h("option", { value: s, selected: s === filters.state }, s || "any")));
  const text = h("input", { name: "text", value: filters.text, type: "search", placeholder: "id, stage, command, error", size: 28 });
  const go = (extra) => {
    const p = new URLSearchParams();
    if (project.value) p.set("project", project.value);
    if (state.value) p.set("state", state.value);
    if (text.value) p.set("text", text.value);
    if (extra) p.set("page", extra);
    location.hash = `#/runs?${p}`;
  };
  const form = h("form", { class: "bar", role: "search", onsubmit: (e) => { e.preventDefault(); go(); } },
    field("Project", project), field("State", state), field("Search", text),
    h("button", { type: "submit", class: "primary" }, "Filter"));
  const body = h("tbody", {});
  const pager = h("div", { class: "pager" });
  const count = h("span", { class: "note", "aria-live": "polite" });
  show(h("h1", {}, "Runs"), form,
    h("table", {}, h("caption", { class: "sr" }, "Runs, newest first"),
      h("thead", {}, h("tr", {}, ["Run", "Project", "State", "Stages", "Submitted", "Took", "Error"].map((x) => h("th", { scope: "col" }, x)))), body),
    pager, count);

  const rows = new Map();
  const stop = new AbortController();
  let reload = null;
  leave.push(() => { stop.abort(); clearTimeout(reload); });
  const params = new URLSearchParams({ limit: "50" });
  for (const k of ["project", "state", "text"]) if (filters[k]) params.set(k, filters[k]);
  if (cursors.length) params.set("cursor", cursors[cursors.length - 1]);

  async function load() {
    const page = await api(`/v1/runs?${params}`);
    rows.clear();
    fill(body, ...page.runs.map((r) => {
      const stateCell = h("td", {}, badge(r.state));
      const tr = h("tr", { "data-run": r.id },
        h("td", { class: "mono" }, h("a", { href: `#/runs/${encodeURIComponent(r.id)}` }, r.id)),
        h("td", {}, r.project_id), stateCell, h("td", {}, r.stages), h("td", {}, when(r.created_at)),
        h("td", {}, r.finished_at ? span(r.created_at, r.finished_at) : "—"), h("td", {}, r.error || ""));
      rows.set(r.id, { tr, stateCell });
      return tr;
    }));
    if (page.runs.length === 0) body.append(h("tr", {}, h("td", { colspan: 7, class: "note" }, "No runs match.")));
    fill(pager, 
      cursors.length ? h("button", { type: "button", onclick: () => go(cursors.slice(0, -1).join(",")) }, "← Newer") : null,
      cursors.length ? h("button", { type: "button", onclick: () => go() }, "Newest") : null,
      page.next_cursor ? h("button", { type: "button", onclick: () => go([...cursors, page.next_cursor].join(",")) }, "Older →") : null);
    count.textContent = `${page.runs.length} runs on this page`;
  }
  await load();

  // Live: the event stream says which runs changed; a visible run's state is updated in place,
  // a new run on the first page reloads it (not under a text search: each would scan again).
  follow("/v1/events?follow=1&types=run.*", (ev) => {
    if (ev.event === "ready" || ev.event === "error") return;
    let e;
    try { e = JSON.parse(ev.data); } catch { return; }
    const row = rows.get(e.run_id);
    if (row) {
      if (filters.state && e.state !== filters.state) { row.tr.remove(); rows.delete(e.run_id); return; }
      fill(row.stateCell, badge(e.state));
      row.tr.classList.remove("flash"); void row.tr.offsetWidth; row.tr.classList.add("flash");
    } else if (!cursors.length && !filters.text && (!filters.state || e.state === filters.state)) {
      clearTimeout(reload);
      reload = setTimeout(() => load().catch((err) => alertBox(err.message)), 400);
    }
  }, stop.signal, liveState);
}

function liveState(up) {
  document.getElementById("live").textContent = up ? "● live" : "○ reconnecting…";
}

// ---------- one run ----------

async function runView(id) {
  const show = screen();
  const stop = new AbortController();
  leave.push(() => stop.abort());
  let run = await api(`/v1/runs/${encodeURIComponent(id)}`);
  const confidential = !!run.encryption;
  const head = h("div");
  const graph = h("div", { class: "panel" });
  const timeline = h("div", { class: "panel" });
  const stagesBox = h("div");
  const snapshot = h("div", { class: "panel" });
  const artifactsBox = h("div");
  const keyBox = confidential ? h("div", { class: "panel", id: "reader" }) : null;
  const logs = logPanel(run, stop.signal, (problems) => keyBox && keyBox.whole(problems));
  let usage = null;

  function paint() {
    fill(head, 
      h("h1", {}, "Run ", h("span", { class: "mono" }, run.id), " ", badge(run.state)),
      h("div", { class: "row" },
        h("span", {}, "Project ", h("strong", {}, run.project_id)),
        h("span", {}, `Submitted ${when(run.created_at)}`),
        run.started_at ? h("span", {}, `started ${when(run.started_at)}`) : null,
        run.finished_at ? h("span", {}, `ended ${when(run.finished_at)} (${span(run.created_at, run.finished_at)})`) : null,
        confidential ? h("span", { class: "badge" }, "confidential") : null,
        terminal.has(run.state) || run.cancel_requested ? null
          : h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel run"),
        run.cancel_requested && !terminal.has(run.state) ? h("span", { class: "note" }, "cancel requested") : null),
      run.error ? h("p", { class: "s-failed" }, run.error) : null,
      (run.warnings || []).length ? h("ul", {}, run.warnings.map((w) => h("li", { class: "note" }, w))) : null);
    fill(graph, h("h2", {}, "Stage graph"), dag(run, (key) => logs.select(key)));
    fill(timeline, h("h2", {}, "Timeline"), timelineSvg(run), legend());
    fill(stagesBox, h("h2", {}, "Stages"), stagesTable(run, usage));
  }
  async function cancel() {
    if (!confirm(`Cancel run ${run.id}?`)) return;
    try { await api(`/v1/runs/${encodeURIComponent(run.id)}/cancel`, { method: "POST" }); await refresh(); } catch (e) { alertBox(e.message); }
  }
  let listedAt = null;   // the state the artifact list was read in (read again when it ends)
  async function refresh() {
    run = await api(`/v1/runs/${encodeURIComponent(id)}`);
    try { usage = await api(`/v1/runs/${encodeURIComponent(id)}/usage`); } catch { usage = null; }
    paint();
    const ended = terminal.has(run.state);
    if (listedAt === null || (ended && !terminal.has(listedAt))) {
      listedAt = run.state;
      artifacts(run, artifactsBox).catch((e) => alertBox(e.message));
    }
  }

  fill(snapshot, h("h2", {}, "Snapshot"), snapshotFacts(run));
  show(head, keyBox, h("div", { class: "grid" }, graph, timeline), stagesBox, logs.node, artifactsBox, snapshot);
  if (confidential) {
    readerPanel(run, keyBox, () => { logs.reopen(); artifacts(run, artifactsBox).catch((e) => alertBox(e.message)); });
    if (reader) logs.reopen();   // a key loaded on another run's page opens this one too
  }
  await refresh();

  // Live: this run's events (one stream for the page) reload its view, coalesced.
  let pending = null;
  leave.push(() => clearTimeout(pending));
  follow(`/v1/events?follow=1&project=${encodeURIComponent(run.project_id)}`, (ev) => {
    if (ev.event === "ready" || ev.event === "error") return;
    let e;
    try { e = JSON.parse(ev.data); } catch { return; }
    if (e.run_id !== run.id) return;
    clearTimeout(pending);
    pending = setTimeout(() => refresh().catch((err) => alertBox(err.message)), 250);
  }, stop.signal, liveState);
}

function snapshotFacts(run) {
  const facts = h("dl", { class: "facts" });
  const add = (k, v) => facts.append(h("dt", {}, k), h("dd", {}, v));
  for (const [i, s] of (run.sources || []).entries()) {
    const r = s.resolved || {};
    add(`source ${s.name || i}`, `${s.kind}${s.url ? " " + s.url : ""}${s.ref ? " @ " + s.ref : ""}${s.path ? " " + s.path : ""}`);
    if (r.commit) add("  commit", h("span", { class: "mono" }, r.commit));
    if (r.input_sha) add("  input_sha", h("span", { class: "mono" }, r.input_sha));
  }
  if (run.encryption) {
    for (const r of run.encryption.recipients || []) add("sealed to", h("span", { class: "mono" }, r));
    if (run.encryption.request) add("request signed by", h("span", { class: "mono" }, run.encryption.request.signing_key));
  }
  return h("div", {}, facts, h("h2", {}, "Definition"), h("pre", { tabindex: 0 }, JSON.stringify(run.definition, null, 2)));
}

/** What each stage waits for: `needs`, or the previous stage when absent. */
function needsOf(run) {
  const defs = run.definition.stages;
  return defs.map((d, i) => (d.needs !== undefined && d.needs !== null ? d.needs : i > 0 ? [defs[i - 1].key] : []));
}

function dag(run, select) {
  const needs = needsOf(run);
  const keys = run.definition.stages.map((d) => d.key);
  const depth = new Map();
  const depthOf = (i, seen = new Set()) => {
    if (depth.has(i)) return depth.get(i);
    if (seen.has(i)) return 0;
    seen.add(i);
    const d = Math.max(-1, ...needs[i].map((k) => depthOf(keys.indexOf(k), seen))) + 1;
    depth.set(i, d);
    return d;
  };
  keys.forEach((_, i) => depthOf(i));
  const columns = [];
  keys.forEach((k, i) => { (columns[depth.get(i)] ||= []).push(i); });
  const W = 150, H = 44, GX = 50, GY = 16;
  const pos = new Map();
  columns.forEach((col, c) => col.forEach((i, r) => pos.set(i, { x: 10 + c * (W + GX), y: 10 + r * (H + GY) })));
  const width = 20 + columns.length * (W + GX) - GX;
  const height = 20 + Math.max(...columns.map((c) => c.length)) * (H + GY) - GY;
  const state = new Map(run.stages.map((s) => [s.key, s.state]));
  const edges = [];
  keys.forEach((k, i) => needs[i].forEach((n) => {
    const a = pos.get(keys.indexOf(n)), b = pos.get(i);
    if (!a || !b) return;
    edges.push(svg("path", { class: "edge", d: `M${a.x + W},${a.y + H / 2} C${a.x + W + GX / 2},${a.y + H / 2} ${b.x - GX / 2},${b.y + H / 2} ${b.x},${b.y + H / 2}` }));
  }));
  const nodes = keys.map((k, i) => {
    const p = pos.get(i), st = state.get(k) || "queued";
    const g = svg("g", { class: "node", tabindex: "0", role: "button", "aria-label": `${k.length > 22 ? k.slice(0, 21) + "…" : k} ${st}`, "aria-description": "shows the stage's logs",
      onclick: () => select(k), onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(k); } } },
    svg("rect", { x: p.x, y: p.y, width: W, height: H, rx: 6, class: `stroke-${st}` }),
    // One text element, so the name read out is the text shown ("key state").
    svg("text", { x: p.x + 8, y: p.y + 18 }, k.length > 22 ? k.slice(0, 21) + "…" : k,
      svg("tspan", { x: p.x + 8, y: p.y + 34, class: `fill-${st}` }, " " + st)));
    return g;
  });
  return svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "group", "aria-label": "Stage graph" }, ...edges, ...nodes);
}

const OUTCOMES = ["succeeded", "failed", "cancelled", "lease_expired", "handed_back", "running"];
function legend() {
  return h("div", { class: "legend" }, OUTCOMES.map((o) => h("span", {}, h("i", { class: `bg-${o}` }), o.replace("_", " "))));
}

/** One bar per attempt over time, coloured by outcome; where it ran and its attestation in
 *  the label; the same facts as a table below for screen readers. */
function timelineSvg(run) {
  const attempts = run.stages.flatMap((s) => (s.attempts || []).map((a) => ({ ...a, stage: s.key })));
  const t0 = new Date(run.created_at).getTime();
  const end = Math.max(Date.now() * (terminal.has(run.state) ? 0 : 1), new Date(run.finished_at || run.created_at).getTime(),
    ...attempts.map((a) => new Date(a.finished_at || a.started_at).getTime()));
  const total = Math.max(1, end - t0);
  const LEFT = 120, WIDTH = 520, ROW = 26;
  const rows = run.stages.map((s, r) => {
    const y = 20 + r * ROW;
    const bars = (s.attempts || []).map((a) => {
      const x0 = LEFT + ((new Date(a.started_at) - t0) / total) * WIDTH;
      const x1 = LEFT + (((a.finished_at ? new Date(a.finished_at) : new Date(Math.min(Date.now(), end))) - t0) / total) * WIDTH;
      const outcome = a.outcome || (a.finished_at ? "lease_expired" : "running");
      const att = a.attestation ? (a.attestation.verified ? " ✓ attested (pond's check)" : " ✗ attestation failed") : "";
      const label = `#${a.number} ${a.owner}${att}`;
      return svg("g", {},
        svg("title", {}, `${s.key} attempt ${a.number}: ${outcome} on ${a.owner}, ${span(a.started_at, a.finished_at)}${att}${a.error ? " — " + a.error : ""}`),
        svg("rect", { x: x0, y: y - 12, width: Math.max(3, x1 - x0), height: 16, rx: 3, class: `fill-${outcome}` }),
        svg("text", { x: Math.min(x0 + 2, LEFT + WIDTH - 60), y: y + 13, "font-size": 9 }, label.length > 40 ? label.slice(0, 39) + "…" : label));
    });
    return svg("g", {}, svg("text", { x: 4, y: y }, s.key.length > 17 ? s.key.slice(0, 16) + "…" : s.key), ...bars);
  });
  const height = 30 + run.stages.length * ROW;
  const picture = svg("svg", { width: "100%", viewBox: `0 0 ${LEFT + WIDTH + 10} ${height}`, class: "timeline", role: "img", "aria-label": "Attempts over time; the table below lists them" },
    svg("text", { x: LEFT, y: 10, "font-size": 9 }, "submitted"),
    svg("text", { x: LEFT + WIDTH - 40, y: 10, "font-size": 9 }, `+${span(new Date(t0).toISOString(), new Date(end).toISOString())}`),
    ...rows);
  const list = table(["Stage", "Attempt", "Outcome", "Where", "Started", "Took", "Attestation"], attempts.map((a) =>
    h("tr", {}, h("td", {}, a.stage), h("td", {}, a.number), h("td", {}, a.outcome || (a.finished_at ? "—" : "running")),
      h("td", { class: "mono" }, a.owner), h("td", {}, when(a.started_at)), h("td", {}, span(a.started_at, a.finished_at)),
      h("td", {}, a.attestation ? (a.attestation.verified ? "verified by pond" : `not verified: ${a.attestation.detail}`) : "—"))), "Attempts");
  return h("div", {}, picture, h("details", {}, h("summary", {}, "Attempts as a table"), list));
}

function stagesTable(run, usage) {
  const spend = new Map();
  for (const [k, v] of Object.entries((usage && usage.attempts) || {})) {
    const stage = k.split("#")[0];
    const s = spend.get(stage) || { requests: 0, input_tokens: 0, output_tokens: 0, cost_usd: 0 };
    for (const f of Object.keys(s)) s[f] += v[f] || 0;
    spend.set(stage, s);
  }
  const rows = run.stages.map((s) => {
    const u = spend.get(s.key);
    return h("tr", {}, h("td", { class: "mono" }, s.key), h("td", {}, s.name !== s.key ? s.name : ""), h("td", {}, badge(s.state)),
      h("td", {}, `${s.attempt}/${s.max_attempts}`), h("td", {}, s.executor), h("td", {}, s.placement),
      h("td", {}, s.exit_code ?? "—"),
      h("td", {}, s.attestation_verified === null || s.attestation_verified === undefined ? "—" : s.attestation_verified ? "verified" : "NOT verified"),
      h("td", {}, u ? `${u.requests} calls, ${u.input_tokens}/${u.output_tokens} tok, $${u.cost_usd.toFixed(4)}` : "—"),
      h("td", {}, s.error || ""));
  });
  const total = usage && usage.total && usage.total.requests
    ? h("p", { class: "note" }, `Model spend: ${usage.total.requests} calls, ${usage.total.input_tokens} input / ${usage.total.output_tokens} output tokens, $${usage.total.cost_usd.toFixed(4)}`)
    : null;
  return h("div", {}, table(["Key", "Name", "State", "Attempts", "Executor", "Placement", "Exit", "Attestation", "Usage", "Error"], rows, "Stages"), total);
}

// ---------- logs ----------

const MAX_LINES = 20000;

function logPanel(run, signal, onWhole) {
  const box = h("div", { class: "logs", tabindex: "0", role: "log", "aria-label": "Log lines", "aria-live": "off" });
  const stageSel = h("select", { name: "stage" }, h("option", { value: "" }, "all stages"),
    run.definition.stages.map((d) => h("option", { value: d.key }, d.key)));
  const search = h("input", { type: "search", name: "search", placeholder: "find in logs", size: 24 });
  const pause = h("button", { type: "button", "aria-pressed": "false" }, "Pause");
  const status = h("span", { class: "note", "aria-live": "polite" });
  const sealed = !!run.encryption;
  let lines = [];   // {line, shown: {kind, text}, el}
  let paused = false, held = [], opener = null, shownCount = 0, ended = false, stream = null, statusQueued = false;

  function classFor(l, shown) {
    // Styled by what was checked, not by the stream a server claims: in a confidential run only
    // `meta` lines are pond's signed checks; clear system lines are marked unsigned.
    if (shown.kind === "bad") return "bad";
    if (shown.kind === "sealed") return "sealed";
    if (shown.kind === "meta") return "ok";
    if (l.stream === "stderr") return "err";
    if (l.stream === "system") return "sys";
    return "";
  }
  function render(entry) {
    const l = entry.line, shown = entry.shown;
    entry.el = h("span", { class: `ln ${classFor(l, shown)}`, "data-stage": l.stage || "" },
      h("span", { class: "st" }, `${l.stage || "run"}#${l.attempt}`),
      l.stream === "stderr" && shown.kind !== "bad" ? h("span", { class: "tag" }, "stderr") : null,
      shown.kind === "meta" ? h("span", { class: "tag" }, "checked") : null,
      sealed && shown.kind === "clear" ? h("span", { class: "tag" }, "pond note, unsigned") : null,
      h("span", { class: "tx" }, shown.text));
  }
  function matches(entry) {
    const want = stageSel.value, needle = search.value.toLowerCase();
    return (!want || entry.line.stage === want) && (!needle || entry.shown.text.toLowerCase().includes(needle));
  }
  function apply(entry) {
    const visible = matches(entry);
    entry.el.hidden = !visible;
    entry.el.classList.toggle("hit", !!search.value && visible);
    return visible;
  }
  function showStatus() {
    // At most once a frame: a replay of thousands of lines updates the count once.
    if (statusQueued) return;
    statusQueued = true;
    requestAnimationFrame(() => {
      statusQueued = false;
      status.textContent = `${shownCount} of ${lines.length} lines shown${held.length ? `, ${held.length} held while paused` : ""}${ended ? "; the run ended" : ""}`;
    });
  }
  function refilter() {
    shownCount = 0;
    for (const e of lines) if (!e.held && apply(e)) shownCount++;
    showStatus();
  }
  function shownFor(l) {
    if (!sealed) return { kind: "plain", text: l.encoding === "base64" ? bytesAsText(l.text) : l.text };
    if (opener) return opener.line(l);
    if (l.stream === "system" && !l.text.startsWith("ENC")) return { kind: "clear", text: l.text };
    return { kind: "sealed", text: "[sealed: load your key above to read it]" };
  }
  function place(entry) {
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 30;
    box.append(entry.el);
    if (apply(entry)) shownCount++;
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
  function add(l) {
    const entry = { line: l, shown: shownFor(l) };
    render(entry);
    lines.push(entry);
    if (lines.length > MAX_LINES) {
      const old = lines.shift();
      if (!old.held && !old.el.hidden) shownCount--;
      old.dropped = true;
      old.el.remove();
    }
    if (paused) { entry.held = true; held.push(entry); } else place(entry);
    showStatus();
  }
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Follow" : "Pause";
    pause.setAttribute("aria-pressed", String(paused));
    if (!paused) {
      for (const e of held) { e.held = false; if (!e.dropped) place(e); }
      held = [];
      box.scrollTop = box.scrollHeight;
    }
    showStatus();
  });
  stageSel.addEventListener("change", refilter);
  search.addEventListener("input", refilter);

  /** Reads the whole log from its start (again): a key loaded later opens every stream from
   *  its signed header, whatever the page had dropped. */
  async function start() {
    if (stream) stream.abort();
    stream = new AbortController();
    signal.addEventListener("abort", () => stream.abort(), { once: true });
    lines = []; held = []; shownCount = 0; ended = false;
    box.replaceChildren();
    const mine = stream.signal;
    follow(`/v1/runs/${encodeURIComponent(run.id)}/logs?follow=1`, (ev) => {
      if (mine.aborted) return false;
      if (ev.event === "log") { try { add(JSON.parse(ev.data)); } catch { /* not a line */ } }
      else if (ev.event === "end") {
        ended = true;
        showStatus();
        if (opener) whole();
        return false;
      } else if (ev.event === "error") { alertBox(`Log stream: ${ev.data}`); return false; }
      return true;
    }, mine);
  }
  async function whole() {
    try {
      const { loggedAttempts } = await import("./open.js");
      const fresh = await api(`/v1/runs/${encodeURIComponent(run.id)}`);
      onWhole(opener.missing(fresh, await loggedAttempts(api, run.id)));
    } catch (e) { onWhole([`the log could not be checked: ${e.message}`]); }
  }
  start();

  const node = h("section", { "aria-labelledby": "logs-h" }, h("h2", { id: "logs-h" }, "Logs"),
    h("div", { class: "row" }, field("Stage", stageSel), field("Find", search), pause, status), box);
  return {
    node,
    select(key) { stageSel.value = key; refilter(); box.focus(); },
    /** Opens every line again with the reader key now loaded (or seals them, once forgotten). */
    async reopen() {
      if (opener) opener.forget();
      opener = null;
      if (reader) {
        const { LogOpener, runSigners } = await import("./open.js");
        opener = new LogOpener(reader, run.id, await runSigners(api, run.id));
      }
      onWhole(null);
      start();
    },
  };
}

/** A line stored as base64 (bytes that are not UTF-8), shown with U+FFFD for what is not. */
function bytesAsText(b64) {
  try {
    return new TextDecoder("utf-8", { fatal: false }).decode(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)));
  } catch {
    return `[${b64.length} base64 characters that do not decode]`;
  }
}

// ---------- confidential runs: the reader's key ----------

function readerPanel(run, box, changed) {
  const file = h("input", { type: "file", id: "keyfile", accept: ".key,.x25519,text/plain" });
  const paste = h("textarea", { id: "keytext", rows: 1, cols: 48, placeholder: "or paste the base64 key", spellcheck: "false", autocomplete: "off" });
  const stateLine = h("p", { "aria-live": "polite" });
  const checks = h("div", { id: "checks", "aria-live": "polite" });
  let request = [], logState = null;
  async function load(text) {
    try {
      const { Reader } = await import("./open.js");
      if (reader) reader.forget();
      reader = await Reader.fromText(text);
      paste.value = "";
      file.value = "";
      paint();
      await changed();
    } catch (e) {
      alertBox(`The key cannot be used: ${e.message}`);
    }
  }
  async function paint() {
    request = [];
    if (reader) {
      const { checkRequest } = await import("./open.js");
      request = checkRequest(reader, run);
    }
    fill(stateLine, reader
      ? h("span", {}, "Key ", h("span", { class: "mono" }, reader.fingerprint), " is in this page's memory only (not stored; the page sends it nowhere). ",
        h("button", { type: "button", onclick: () => { reader.forget(); reader = null; forgetPreviews(); paint(); changed(); } }, "Forget key"))
      : h("span", {}, "This run's output is sealed to its recipients' keys; the server holds only ciphertext. Load your key to read it in this page."));
    showChecks();
  }
  function showChecks() {
    if (!reader) { fill(checks); return; }
    const items = [];
    items.push(request.length
      ? h("li", { class: "s-failed" }, `The signed request does not hold: ${request.join("; ")}`)
      : h("li", { class: "s-succeeded" }, "The run's request is signed by your key and covers every recipient it is sealed to."));
    if (logState === null) items.push(h("li", { class: "note" }, "The log is checked when the run has ended and every line is read."));
    else if (logState.length) items.push(h("li", { class: "s-failed" }, `The log is not whole: ${logState.join("; ")}`));
    else items.push(h("li", { class: "s-succeeded" }, "Every stream is whole: each attempt's signed final record matches the lines read."));
    fill(checks, h("ul", {}, items));
  }
  box.whole = (problems) => { logState = problems; showChecks(); };
  file.addEventListener("change", async () => { if (file.files[0]) await load(await file.files[0].text()); });
  fill(box, h("h2", {}, "Confidential run"), stateLine, checks,
    h("div", { class: "row" }, h("label", { for: "keyfile" }, "Key file", file),
      h("label", { for: "keytext" }, "Key", paste),
      h("button", { type: "button", onclick: () => load(paste.value) }, "Open with this key")),
    h("p", { class: "note" }, "This page comes from the pond server itself: it opens your output without sending the key, "
      + "but only as far as you trust that server's code. Where you do not, read the run with `pond run logs` or your own libsodium client."));
  paint();
}

// ---------- artifacts ----------

const IMAGE = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", webp: "image/webp" };
let previews = [];   // blob URLs of opened artifacts: revoked when the view changes or the key is forgotten

function forgetPreviews() {
  for (const url of previews) URL.revokeObjectURL(url);
  previews = [];
  const open = document.getElementById("preview");
  if (open) fill(open);
}

async function artifacts(run, box) {
  const list = (await api(`/v1/runs/${encodeURIComponent(run.id)}/artifacts`)).artifacts || [];
  const confidential = !!run.encryption;
  const shown = list.filter((a) => !(confidential && a.name.endsWith(".pondkey")));
  const preview = h("div", { id: "preview" });
  const path = (name) => `/v1/runs/${encodeURIComponent(run.id)}/artifacts/${name.split("/").map(encodeURIComponent).join("/")}`;

  async function bytesOf(a) {
    const data = await api(path(a.name), { bytes: true });
    if (!confidential) return data;
    if (!reader) throw new Error("this artifact is sealed: load your key above first");
    const { openArtifact, runSigners } = await import("./open.js");
    const sidecar = await api(path(a.name + ".pondkey"));
    return openArtifact(reader, run.id, a, data, sidecar, await runSigners(api, run.id));
  }
  async function download(a) {
    try {
      const data = await bytesOf(a);
      const url = URL.createObjectURL(new Blob([data], { type: "application/octet-stream" }));
      const link = h("a", { href: url, download: a.name.split("/").pop() });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) { alertBox(`${a.name}: ${e.message}`); }
  }
  async function look(a) {
    try {
      const data = await bytesOf(a);
      const ext = (a.name.split(".").pop() || "").toLowerCase();
      let view;
      if (IMAGE[ext]) {
        forgetPreviews();
        const url = URL.createObjectURL(new Blob([data], { type: IMAGE[ext] }));
        previews.push(url);
        view = h("img", { class: "preview", src: url, alt: `${a.name} (artifact of stage ${a.stage})` });
      } else {
        const text = new TextDecoder().decode(data.slice(0, 1 << 20));
        if (ext === "jsonl") view = jsonlTable(text);
        else view = h("pre", { tabindex: 0 }, text + (data.length > 1 << 20 ? "\n… (first MiB shown)" : ""));
      }
      fill(preview, h("h3", {}, a.name), view);
      preview.scrollIntoView({ block: "nearest" });
    } catch (e) { alertBox(`${a.name}: ${e.message}`); }
  }
  fill(box, h("h2", {}, "Artifacts"), shown.length === 0 ? h("p", { class: "note" }, "None yet.")
    : table(["Name", "Stage", "Attempt", "Size", "SHA-256", ""], shown.map((a) => h("tr", {},
      h("td", { class: "mono" }, a.name), h("td", {}, a.stage), h("td", {}, a.attempt), h("td", {}, `${a.size} B`),
      h("td", { class: "mono" }, a.sha256.slice(0, 16) + "…"),
      h("td", {}, h("button", { type: "button", onclick: () => look(a), "aria-label": `Preview ${a.name}` }, "Preview"), " ",
        h("button", { type: "button", onclick: () => download(a), "aria-label": `Download ${a.name}` }, "Download")))), "Artifacts"),
  preview);
}

function jsonlTable(text) {
  const rows = text.split("\n").filter((l) => l.trim()).slice(0, 500).map((l) => { try { return JSON.parse(l); } catch { return { "(not JSON)": l }; } });
  const cols = [...new Set(rows.flatMap((r) => (r && typeof r === "object" && !Array.isArray(r) ? Object.keys(r) : ["value"])))].slice(0, 20);
  const cell = (v) => (v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));
  return table(cols, rows.map((r) => h("tr", {}, cols.map((c) => h("td", {}, cell(r && typeof r === "object" && !Array.isArray(r) ? r[c] : c === "value" ? r : undefined))))), "Rows of the JSONL file");
}

// ---------- pools ----------

async function poolsView() {
  const show = screen();
  const list = await api("/v1/admin/pools");
  const runLink = (job) => {
    if (!job) return "idle";
    const runId = job.split(".")[0];
    return h("a", { href: `#/runs/${encodeURIComponent(runId)}`, class: "mono" }, job);
  };
  const member = (m, worker) => h("tr", { "data-member": m.id },
    h("td", {}, m.name), h("td", { class: "mono" }, m.id), h("td", {}, m.pool), h("td", {}, (m.tags || []).join(", ")),
    h("td", {}, (m.capabilities || []).join(", ")), h("td", {}, m.version || "—"),
    h("td", {}, h("span", { title: m.last_seen || "" }, ago(m.last_seen))), h("td", {}, worker ? runLink(m.current_job) : "—"),
    h("td", {}, m.revoked_at ? "revoked" : m.draining ? "draining" : "active"),
    h("td", {}, worker && !m.revoked_at ? h("button", { type: "button", onclick: () => drain(m, !m.draining),
      "aria-label": `${m.draining ? "Undrain" : "Drain"} worker ${m.name}` }, m.draining ? "Undrain" : "Drain") : null));
  async function drain(m, draining) {
    try {
      await api(`/v1/admin/pools/workers/${encodeURIComponent(m.id)}/drain`, { method: "POST", body: { draining } });
      if (show.current()) await poolsView();
    } catch (e) { alertBox(e.message); }
  }
  const head = ["Name", "Id", "Pool", "Tags", "Capabilities", "Version", "Last seen", "Current job", "State", ""];
  show(h("h1", {}, "Pools"),
    h("h2", {}, "Workers"), list.workers.length ? table(head, list.workers.map((w) => member(w, true)), "Workers") : h("p", { class: "note" }, "No workers enrolled."),
    h("h2", {}, "Orchestrators"), list.orchestrators.length ? table(head, list.orchestrators.map((o) => member(o, false)), "Orchestrators") : h("p", { class: "note" }, "No orchestrators enrolled."));
}

// ---------- agents ----------

async function agentsView() {
  const show = screen();
  const [models, harnesses, presets, creds] = await Promise.all([
    api("/v1/admin/models"), api("/v1/admin/harnesses"), api("/v1/admin/harness-presets"), api("/v1/admin/credentials")]);
  const dry = h("div", { id: "dryrun" });
  const modelChoice = h("select", { name: "model" },
    (models.models || []).map((m, i) => h("option", { value: m.key, selected: i === 0 }, m.key)), h("option", { value: "" }, "no model"));
  const prompt = h("input", { name: "prompt", value: "fix the failing test", size: 30 });
  async function dryRun(key) {
    try {
      const r = await api(`/v1/admin/harnesses/${encodeURIComponent(key)}/dry-run`, { method: "POST",
        body: { model_ref: modelChoice.value || null, prompt: prompt.value } });
      fill(dry, h("h3", {}, `Dry run of ${key}`),
        h("pre", { tabindex: 0 }, `argv: ${JSON.stringify(r.argv, null, 1)}\nenv: ${JSON.stringify(r.env)}\nstdin: ${r.stdin ?? "—"}`),
        (r.warnings || []).length ? h("ul", {}, r.warnings.map((w) => h("li", { class: "s-queued" }, `warning: ${w}`))) : h("p", { class: "note" }, "No lint warnings."));
    } catch (e) { alertBox(e.message); }
  }
  const harnessRows = (list, preset) => list.map((x) => h("tr", {}, h("td", { class: "mono" }, x.key), h("td", {}, x.capability),
    h("td", { class: "mono" }, (x.command_template || []).join(" ")), h("td", {}, Object.keys(x.env || {}).join(", ")),
    h("td", {}, preset ? null : h("button", { type: "button", onclick: () => dryRun(x.key), "aria-label": `Dry run ${x.key}` }, "Dry run"))));
  show(h("h1", {}, "Agents"),
    h("h2", {}, "Models"), table(["Key", "Provider", "Model", "Capability", "Credential", "Base URL", "$/Mtok in", "$/Mtok out"],
      (models.models || []).map((m) => h("tr", {}, h("td", { class: "mono" }, m.key), h("td", {}, m.provider), h("td", {}, m.model_id),
        h("td", {}, m.capability), h("td", {}, m.credential_name), h("td", {}, m.base_url || "—"),
        h("td", {}, m.input_usd_per_mtok ?? "—"), h("td", {}, m.output_usd_per_mtok ?? "—"))), "Models"),
    h("h2", {}, "Harnesses"), h("form", { class: "bar", onsubmit: (e) => e.preventDefault() }, field("Dry-run model", modelChoice), field("Dry-run prompt", prompt)),
    table(["Key", "Capability", "Command", "Env", ""], harnessRows(harnesses.harnesses || [], false), "Harnesses"), dry,
    h("h2", {}, "Presets"), table(["Key", "Capability", "Command", "Env", ""], harnessRows(presets.harnesses || [], true), "Harness presets"),
    h("h2", {}, "Credentials"), h("p", { class: "note" }, "Names only: secrets are sealed and never shown."),
    table(["Name", "Provider", "Env", "Projects", "Key fingerprint", "Created"], (creds.credentials || []).map((c) => h("tr", {},
      h("td", { class: "mono" }, c.name), h("td", {}, c.provider), h("td", {}, c.env), h("td", {}, (c.projects || []).join(", ") || "all"),
      h("td", { class: "mono" }, c.key_fingerprint), h("td", {}, when(c.created_at)))), "Credentials"));
}

// ---------- keys ----------

async function keysView(created) {
  const show = screen();
  const list = await api("/v1/admin/keys");
  const name = h("input", { name: "name", required: true, size: 18 });
  const projects = h("input", { name: "projects", placeholder: "comma-separated", size: 24, required: true });
  const form = h("form", { class: "bar", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const key = await api("/v1/admin/keys", { method: "POST", body: { name: name.value, projects: projects.value.split(",").map((p) => p.trim()).filter(Boolean) } });
      if (show.current()) await keysView(key);
    } catch (err) { alertBox(err.message); }
  } }, field("Name", name), field("Projects", projects), h("button", { type: "submit", class: "primary" }, "Create consumer key"));
  async function revoke(k) {
    if (!confirm(`Revoke key ${k.name} (${k.id})? Every call with it is refused from now on.`)) return;
    try {
      await api(`/v1/admin/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
      if (show.current()) await keysView();
    } catch (e) { alertBox(e.message); }
  }
  show(h("h1", {}, "Keys"), form,
    created ? h("div", { class: "panel", id: "new-token" }, h("p", {}, `Key ${created.name} made. Its token is shown once, now: copy it.`),
      h("div", { class: "token" }, created.token),
      h("button", { type: "button", onclick: () => navigator.clipboard && navigator.clipboard.writeText(created.token) }, "Copy")) : null,
    table(["Name", "Id", "Role", "Projects", "Created", "State", ""], list.keys.map((k) => h("tr", { "data-key": k.id },
      h("td", {}, k.name), h("td", { class: "mono" }, k.id), h("td", {}, k.role), h("td", {}, (k.projects || []).join(", ")),
      h("td", {}, when(k.created_at)), h("td", {}, k.revoked_at ? `revoked ${when(k.revoked_at)}` : "active"),
      h("td", {}, k.revoked_at || k.id === me.key_id ? null
        : h("button", { type: "button", class: "danger", onclick: () => revoke(k), "aria-label": `Revoke key ${k.name}` }, "Revoke")))), "API keys"));
}

// ---------- routing ----------

async function render() {
  const mine = ++views;
  for (const stop of leave) stop();
  forgetPreviews();
  leave = [];
  document.getElementById("live").textContent = "";
  const [path] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  if (!sessionStorage.getItem(TOKEN)) { me = null; navigation(); return signInView(); }
  if (!me) {
    try { me = await api("/v1/whoami"); } catch (e) { if (mine === views) { navigation(); signInView(e.message); } return; }
    if (mine !== views) return;
  }
  navigation();
  alertBox("");
  try {
    if (parts[0] === "runs" && parts[1]) await runView(decodeURIComponent(parts[1]));
    else if (parts[0] === "pools") await poolsView();
    else if (parts[0] === "agents") await agentsView();
    else if (parts[0] === "keys") await keysView();
    else await runsView();
    document.title = `Pond · ${parts[0] || "runs"}`;
  } catch (e) {
    if (e.status !== 401) { fill($main, h("h1", {}, "Something went wrong")); alertBox(e.message); }
  }
}

window.addEventListener("hashchange", render);
render();
