"""Drives the Pond console in a real browser (headless Chromium from Debian's `chromium`, through
Playwright) against a live server the Rust test prepared, the way a person would: signs in,
watches a run go from submitted to succeeded without reloading, reads logs, opens a
confidential run with a key file, downloads artifacts, drains a worker, revokes a key. Every
request and response of the confidential session is recorded and searched for plaintext.
axe-core checks each page. Screenshots go to `shots`.

usage: console_check.py CONFIG_JSON  (see bins/tests/console.rs for the fields)
prints one JSON object of findings; exits non-zero on a failed step (the message says which).
"""
import base64
import json
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

cfg = json.load(open(sys.argv[1]))
URL, ADMIN, CONSUMER = cfg["url"], cfg["admin_token"], cfg["consumer_token"]
RUNS, SHOTS = cfg["runs"], cfg["shots"]
AXE = open(cfg["axe"]).read()
found = {"axe": {}, "steps": []}


def step(name):
    found["steps"].append(name)
    print(f"step: {name}", file=sys.stderr, flush=True)


def call(path, token=ADMIN, body=None, method=None):
    req = urllib.request.Request(URL + path, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req) as r:
        data = r.read()
        return json.loads(data) if data else None


def axe(page, name):
    """axe-core's violations of serious or critical impact on the page as it is now."""
    page.evaluate(AXE)
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
            nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}));
    }""")
    found["axe"][name] = [v for v in result if v["impact"] in ("serious", "critical")]
    found.setdefault("axe_minor", {})[name] = [v["id"] for v in result if v["impact"] not in ("serious", "critical")]


def shot(page, name):
    page.screenshot(path=f"{SHOTS}/{name}.png", full_page=True)


def open_run(page, run_id, ended=True):
    """Opens a run's page and waits for that page itself (the previous view of the same
    document may still show its own run, or its own "the run ended")."""
    page.goto(URL + f"/#/runs/{run_id}")
    page.wait_for_function(f"() => document.querySelector('h1 .mono')?.textContent === '{run_id}'")
    if ended:
        page.wait_for_function("() => [...document.querySelectorAll('.row .note')]"
                               ".some(e => e.textContent.includes('the run ended'))")


def sign_in(page, token):
    page.goto(URL + "/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Runs')")


csp_errors = []
open_pages = []


def on_failure(kind, value, tb):
    """A failed step: the page's alert and script errors help more than the traceback alone."""
    import traceback
    traceback.print_exception(kind, value, tb)
    print("script errors:", csp_errors, file=sys.stderr)
    for i, page in enumerate(open_pages):
        try:
            print(f"page {i} at {page.url}: alert: {page.inner_text('#alert', timeout=1000)!r}", file=sys.stderr)
            page.screenshot(path=f"{SHOTS}/failed-{i}.png", full_page=True)
        except Exception:
            pass


sys.excepthook = on_failure

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=cfg["chromium"], args=["--no-sandbox"])

    def new_page(context):
        page = context.new_page()
        page.on("console", lambda m: csp_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: csp_errors.append(f"pageerror: {e}"))
        page.on("dialog", lambda d: d.accept())
        open_pages.append(page)
        return page

    # 1. A consumer signs in and sees only its project's runs; the token is in session storage,
    # never in a URL.
    step("consumer sign-in")
    consumer_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    cpage = new_page(consumer_ctx)
    urls = []
    cpage.on("request", lambda r: urls.append(r.url))
    sign_in(cpage, CONSUMER)
    cpage.wait_for_selector("tr[data-run]")
    found["consumer_runs"] = cpage.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
    found["consumer_nav"] = cpage.inner_text("#nav")
    found["token_in_url"] = any(CONSUMER in u for u in urls) or CONSUMER in cpage.url
    found["token_in_local_storage"] = CONSUMER in cpage.evaluate("JSON.stringify(localStorage)")
    found["token_in_session_storage"] = CONSUMER in cpage.evaluate("JSON.stringify(sessionStorage)")

    # 2. An admin watches a new run appear and succeed without a reload.
    step("live run list")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = new_page(ctx)
    sign_in(page, ADMIN)
    page.wait_for_selector("#live:text('live')")
    page.evaluate("window.__sameDocument = 'yes'")
    run = call("/v1/runs", body={"project_id": "web", "definition": {"stages": [
        {"key": "slow", "executor": {"kind": "shell", "argv": ["sh", "-c", "sleep 2; echo watched"]}}]}})
    live_id = run["id"]
    page.wait_for_selector(f"tr[data-run='{live_id}']", timeout=15000)
    seen = []
    deadline = time.time() + 30
    while time.time() < deadline:
        state = page.inner_text(f"tr[data-run='{live_id}'] .badge")
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "succeeded":
            break
        time.sleep(0.1)
    found["live_states"] = seen
    found["live_same_document"] = page.evaluate("window.__sameDocument") == "yes"
    shot(page, "runs")
    axe(page, "runs")
    # Filters: by state and by text (a stage key of one run).
    page.select_option("select[name=state]", "failed")
    page.click("form[role=search] button[type=submit]")
    page.wait_for_function("() => location.hash.includes('state=failed')")
    page.wait_for_selector(f"tr[data-run='{RUNS['failed']}']")
    found["failed_filter"] = page.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
    # (Each wait below is for the new view's own rows: its filter shown, its rows arrived.)
    page.goto(URL + "/#/runs?text=" + cfg["search_text"])
    page.wait_for_function(f"() => document.querySelector('input[name=text]')?.value === '{cfg['search_text']}' && "
                           "document.querySelectorAll('tr[data-run]').length > 0")
    found["text_filter"] = page.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
    # Paging: 50 a page, "Older" goes on from the cursor.
    page.goto(URL + "/#/runs?project=bulk")
    page.wait_for_function("() => document.querySelector('input[name=project]')?.value === 'bulk' && "
                           "document.querySelectorAll('tr[data-run]').length > 0")
    first_page = page.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
    page.click("text=Older →")
    page.wait_for_function("() => location.hash.includes('page=')")
    # The next page is painted once its rows arrived: some rows, none of the first page's.
    page.wait_for_function(
        f"() => document.querySelectorAll('tr[data-run]').length > 0 && !document.querySelector(\"tr[data-run='{first_page[0]}']\")")
    second_page = page.eval_on_selector_all("tr[data-run]", "rows => rows.map(r => r.dataset.run)")
    found["paging"] = {"first": len(first_page), "second": len(second_page), "overlap": len(set(first_page) & set(second_page))}

    # 3. Keyboard: the skip link first, then the sections; Enter on a focused run opens it.
    step("keyboard")
    page.goto(URL + "/#/runs?project=web")
    page.reload()
    page.wait_for_selector("tr[data-run]")
    shot(page, "runs-web")
    page.keyboard.press("Tab")
    found["first_tab"] = page.evaluate("document.activeElement.textContent")
    page.focus(f"tr[data-run='{RUNS['local']}'] a")
    page.keyboard.press("Enter")
    page.wait_for_selector("h2:text('Stage graph')")
    found["enter_opens_run"] = RUNS["local"] in page.url

    # 4. A local run: graph, timeline, logs (stderr marked, stage filter, search), artifacts.
    step("run page")
    page.wait_for_selector(".logs .ln")
    page.wait_for_selector("text=the run ended")
    found["dag_nodes"] = page.locator("svg g.node").count()
    found["timeline_bars"] = page.locator("svg.timeline rect").count()
    found["stderr_lines"] = page.locator(".logs .ln.err").all_inner_texts()
    found["log_text"] = page.inner_text(".logs")
    page.select_option("select[name=stage]", "second")
    found["stage_filter_visible"] = page.locator(".logs .ln:visible").all_inner_texts()
    page.select_option("select[name=stage]", "")
    page.fill("input[name=search]", "needle-42")
    found["search_visible"] = page.locator(".logs .ln:visible").all_inner_texts()
    page.fill("input[name=search]", "")
    page.wait_for_selector("text=report.jsonl")
    with page.expect_download() as d:
        page.click("button[aria-label='Download report.jsonl']")
    found["download"] = open(d.value.path(), "rb").read().decode()
    page.click("button[aria-label='Preview report.jsonl']")
    page.wait_for_selector("#preview table")
    found["jsonl_headers"] = page.locator("#preview th").all_inner_texts()
    found["jsonl_cells"] = page.locator("#preview td").all_inner_texts()
    page.click("button[aria-label='Preview pixel.png']")
    page.wait_for_selector("#preview img.preview")
    found["image_loaded"] = page.evaluate("document.querySelector('#preview img').naturalWidth")
    shot(page, "run")
    axe(page, "run")

    # 5. Retried and pooled runs: every attempt on the timeline, where it ran, its attestation.
    step("retried and pooled")
    open_run(page, RUNS['retried'])
    page.click("text=Attempts as a table")
    found["retried_attempts"] = page.locator("details table tbody tr").all_inner_texts()
    found["retried_bars"] = page.locator("svg.timeline rect").count()
    open_run(page, RUNS['pooled'])
    page.click("text=Attempts as a table")
    found["pooled_attempts"] = page.locator("details table tbody tr").all_inner_texts()
    shot(page, "run-pooled")

    # Cancel from the run page.
    step("cancel")
    long_run = call("/v1/runs", body={"project_id": "web", "definition": {"stages": [
        {"key": "forever", "executor": {"kind": "shell", "argv": ["sleep", "60"]}}]}})["id"]
    open_run(page, long_run, ended=False)
    page.wait_for_selector("button:text('Cancel run')")
    page.wait_for_selector("h1 .badge:text('running')")
    page.click("button:text('Cancel run')")
    page.wait_for_selector("h1 .badge:text('cancelled')", timeout=30000)
    found["cancelled_in_api"] = call(f"/v1/runs/{long_run}")["state"]

    # 6. A confidential run, in a fresh context whose every request and response is kept.
    step("confidential")
    secret_ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    spage = new_page(secret_ctx)
    traffic = []
    spage.on("request", lambda r: traffic.append(("request", r.url, (r.post_data or "") + json.dumps(r.headers))))
    responses = []
    spage.on("response", lambda r: responses.append(r))
    sign_in(spage, CONSUMER)
    open_run(spage, RUNS["confidential"])
    found["sealed_before_key"] = spage.locator(".logs .ln.sealed").count()
    found["marker_before_key"] = cfg["marker"] in spage.inner_text("body")
    spage.set_input_files("#keyfile", cfg["key_file"])
    try:
        spage.wait_for_selector(f".logs :text('{cfg['marker']}')", timeout=20000)
    except Exception:
        shot(spage, "failed-confidential")
        print("page errors:", csp_errors, "\nalert:", spage.inner_text("#alert"), "\nlogs:", spage.inner_text(".logs"), file=sys.stderr)
        raise
    found["decrypted_lines"] = [t for t in spage.locator(".logs .ln").all_inner_texts() if cfg["marker"] in t]
    found["bad_lines"] = spage.locator(".logs .ln.bad").all_inner_texts()
    found["whole_streams"] = [t for t in spage.locator(".logs .ln.ok").all_inner_texts() if "is whole" in t]
    spage.wait_for_selector("#checks :text('Every stream is whole')", timeout=20000)
    found["checks"] = spage.inner_text("#checks")
    with spage.expect_download() as d:
        spage.click("button[aria-label='Download secret.txt']")
    found["confidential_download"] = open(d.value.path(), "rb").read().decode()
    spage.click("button[aria-label='Preview secret.txt']")
    spage.wait_for_selector("#preview pre")
    found["confidential_preview"] = spage.inner_text("#preview pre")
    found["key_in_storage"] = cfg["key_b64"] in spage.evaluate("JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")
    shot(spage, "run-confidential")
    axe(spage, "run-confidential")
    # Every body the page received, read while the page is open (a followed event stream never
    # ends, so its body cannot be read; a followed log ends with the run, so it can).
    bodies, unread, streams = [], [], []
    for r in responses:
        if "/v1/events" in r.url and "follow=1" in r.url:
            streams.append(r.url)
            continue
        try:
            bodies.append((r.url, r.body()))
        except Exception as e:
            unread.append(f"{r.url}: {e}")
    # The events those streams carried, read as a page:
    if streams:
        bodies.append(("/v1/events", json.dumps(call("/v1/events?project=web&limit=1000", token=CONSUMER)).encode()))
    found["unread_responses"] = unread
    found["responses_checked"] = len(bodies)
    found["plaintext_in_traffic"] = [u for (u, b) in bodies if cfg["marker"].encode() in b or cfg["artifact_marker"].encode() in b]
    found["plaintext_in_requests"] = [u for (_, u, t) in traffic if cfg["marker"] in t or cfg["artifact_marker"] in t]
    found["key_in_requests"] = [u for (_, u, t) in traffic if cfg["key_b64"] in t]
    found["ciphertext_served"] = any(b"ENC2:" in b for (_, b) in bodies)

    # 6b. As someone holding the database: the final record of one stream deleted, a clear
    # system line claiming that stream is whole inserted. The page says the log is not whole,
    # and shows the forged line as an unsigned note, not as a check.
    step("tampered log")
    import sqlite3
    db = sqlite3.connect(cfg["db_path"], timeout=10)
    db.execute("DELETE FROM logs WHERE run_id = ? AND stage = 'sealed' AND text LIKE 'ENC2F:%'", (RUNS["confidential"],))
    forged = "stream of stage sealed attempt 1 is whole: 1 line, final record signed"
    db.execute("INSERT INTO logs (run_id, stage, attempt, stream, at, text) VALUES (?, 'sealed', 1, 'system', 0, ?)",
               (RUNS["confidential"], forged))
    db.commit()
    db.close()
    spage.reload()
    spage.wait_for_selector("text=the run ended")
    spage.set_input_files("#keyfile", cfg["key_file"])
    spage.wait_for_selector("#checks :text('not whole')", timeout=20000)
    found["tampered_checks"] = spage.inner_text("#checks")
    forged_line = spage.locator(".logs .ln", has_text=forged).last
    found["forged_line_class"] = forged_line.get_attribute("class")
    found["forged_line_text"] = forged_line.inner_text()
    shot(spage, "run-confidential-tampered")

    # 7. Hostile text renders as text.
    step("xss")
    open_run(page, RUNS['xss'])
    page.wait_for_selector("h2:text('Artifacts') + table")
    found["xss_fired"] = page.evaluate("window.__pwned || null")
    found["xss_log_text"] = page.inner_text(".logs")
    found["xss_stage_names"] = page.inner_text("h2:text('Stages') + div")
    found["xss_artifacts"] = page.inner_text("h2:text('Artifacts') + table")
    found["xss_injected_elements"] = page.evaluate(
        "document.querySelectorAll('main script, main img:not(.preview), main [onerror], main iframe').length")

    # 8. Pools: drain and undrain a worker.
    step("pools")
    page.goto(URL + "/#/pools")
    page.wait_for_selector(f"tr[data-member='{cfg['worker_id']}']")
    row = f"tr[data-member='{cfg['worker_id']}']"
    found["worker_row"] = page.inner_text(row)
    page.click(f"{row} button:text('Drain')")
    page.wait_for_selector(f"{row} button:text('Undrain')")
    workers = call("/v1/admin/pools")["workers"]
    found["drained_in_api"] = next(w for w in workers if w["id"] == cfg["worker_id"])["draining"]
    shot(page, "pools")
    axe(page, "pools")
    page.click(f"{row} button:text('Undrain')")
    page.wait_for_selector(f"{row} button:text('Drain')")
    workers = call("/v1/admin/pools")["workers"]
    found["undrained_in_api"] = not next(w for w in workers if w["id"] == cfg["worker_id"])["draining"]

    # 9. Agents: models, harnesses, a dry run showing argv; credentials by name only.
    step("agents")
    page.goto(URL + "/#/agents")
    page.wait_for_selector("h2:text('Credentials')")
    found["agents_text"] = page.inner_text("main")
    page.click("button[aria-label='Dry run codex']")
    page.wait_for_selector("#dryrun pre")
    found["dry_run"] = page.inner_text("#dryrun")
    shot(page, "agents")
    axe(page, "agents")

    # 10. Keys: create one (token shown once), revoke the consumer's: its open console signs out.
    step("keys")
    page.goto(URL + "/#/keys")
    page.wait_for_selector("h1:text('Keys')")
    page.fill("input[name=name]", "made-in-console")
    page.fill("input[name=projects]", "web")
    page.click("button:text('Create consumer key')")
    page.wait_for_selector("#new-token .token")
    new_token = page.inner_text("#new-token .token")
    found["new_token_works"] = call("/v1/whoami", token=new_token)["projects"] == ["web"]
    page.goto(URL + "/#/runs")
    page.wait_for_selector("h1:text('Runs')")
    page.goto(URL + "/#/keys")
    page.wait_for_selector("h1:text('Keys')")
    page.wait_for_selector("tr[data-key]")
    found["token_shown_again"] = new_token in page.inner_text("main")
    shot(page, "keys")
    axe(page, "keys")
    page.click(f"button[aria-label='Revoke key {cfg['consumer_key_name']}']")
    page.wait_for_selector(f"tr[data-key='{cfg['consumer_key_id']}'] :text('revoked')")
    cpage.goto(URL + "/#/runs")
    cpage.reload()
    cpage.wait_for_selector("#token", timeout=15000)
    found["revoked_consumer_signed_out"] = cpage.inner_text("body")
    shot(cpage, "signin")
    axe(cpage, "signin")

    found["console_errors"] = csp_errors
    browser.close()

print(json.dumps(found))
