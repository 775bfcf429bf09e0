"""Screenshots of MLflow's UI for tests: the "compare runs" view, in headless Chromium via Playwright.

`compare_runs_screenshot` opens `<tracking_uri>/#/compare-runs?runs=[...]&experiments=[...]` (the URL the
MLflow 3.17 UI builds itself: `Routes.getCompareRunPageRoute`, JSON arrays without spaces), waits for real
content, saves a PNG and returns the page's text. What the page shows (MLflow 3.17.2):

- "Visualizations" (plots; collapsed here: they are one-metric plots that push the tables down),
  "Run details" (Run ID: header row with the ids, Run Name:, Start Time:, End Time:, Duration:),
  "Parameters", "Metrics", "Artifacts", "Tags" (collapsible sections, all open by default);
- the "MLflow Assistant" side panel, open on a first visit: closed here, so the tables get the width;
- the Metrics table is a react-virtualized grid, at most 300 px (~6.7 rows of 45 px) tall, with the keys
  in one grid and the values in another, so `innerText` lists the keys, then the values, and rows far
  below the fold are not in the DOM at all. The helper therefore scrolls that grid through all rows and
  appends them, row-aligned, to the returned text (see `METRICS_HEADER`), e.g.
  `refcoco-val/cIoU\t0.5\t0.612` (values as the UI formats them: `format_metric`).

The page lays out in a fixed-height shell with its own scrolling container, so a plain full-page
screenshot shows only the viewport: the viewport is grown to the content's height first (width stays).

Everything is loopback: requests to any other host than the tracking server's are aborted (and listed
in errors). The server's port is passed to `--explicitly-allowed-ports`, so even a port on Chromium's
unsafe list (5060, 5061, 6000, 10080, ...) works.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

VIEWPORT = {"width": 1600, "height": 1000}
MAX_HEIGHT = 12000  # px: a taller page is cut (Chromium's own texture limit is 16384)
METRICS_HEADER = "--- Metrics table, all rows (key, then one value per run, tab-separated) ---"


class CompareRunsPageError(AssertionError):
    """The compare-runs page did not show what was expected in time (message: URL, what is missing)."""


def compare_runs_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """The URL of MLflow's compare-runs view, in the form the MLflow 3.17 UI links to it."""
    runs = json.dumps([str(r) for r in run_ids], separators=(",", ":"))
    experiments = json.dumps([str(experiment_id)], separators=(",", ":"))
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def format_metric(value: float) -> str:
    """A metric value as the MLflow UI prints it (`Utils.formatMetric`, MLflow 3.17): 3 decimals below
    10, 2 below 100, else 1; exponential below 0.001. JavaScript's rounding and number printing."""

    def js_round(x: float) -> float:  # Math.round: half up, not Python's half to even
        return math.floor(x + 0.5)

    def js_str(x: float) -> str:  # Number.prototype.toString for the values this produces
        if math.isnan(x):
            return "NaN"
        return str(int(x)) if x == int(x) and abs(x) < 1e21 else repr(x)

    v = float(value)
    if v == 0:
        return "0"
    if abs(v) < 0.001:
        mantissa, exp = f"{v:.3e}".split("e")
        return f"{mantissa}e{'+' if int(exp) >= 0 else '-'}{abs(int(exp))}"
    if abs(v) < 10:
        return js_str(js_round(1000 * v) / 1000)
    if abs(v) < 100:
        return js_str(js_round(100 * v) / 100)
    return js_str(js_round(10 * v) / 10)


def _get_run(tracking_uri: str, run_id: str) -> dict:
    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/get?run_id={urllib.parse.quote(run_id)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)["run"]


# One look at the page: what has rendered so far. Returns plain data for the Python side to judge.
_PROBE_JS = r"""
() => {
  const text = document.body ? document.body.innerText : "";
  const failed = /Error while loading compare runs page|Runs were not found|Error while parsing URL/.test(text);
  const view = document.querySelector(".CompareRunView");
  if (!view) return {view: false, failed, text: text.slice(0, 2000)};
  const rows = {};
  for (const tr of view.querySelectorAll("table.mlflow-compare-run-table tr")) {
    const cells = [...tr.children].map(c => c.innerText.trim());
    if (cells.length) rows[cells[0]] = cells.slice(1);
  }
  const sections = {};
  for (const h of view.querySelectorAll(".du-bois-light-collapse-header")) {
    sections[h.innerText.trim()] = h.getAttribute("aria-expanded") === "true";
  }
  return {view: true, failed, text: text.slice(0, 2000), runIds: rows["Run ID:"] || [],
          runNames: rows["Run Name:"] || [], sections,
          noMetrics: text.includes("No metrics to display.")};
}
"""

# Clicks a collapsible section's header of the compare view to open (or close) it.
_SET_SECTION_JS = r"""
([title, open]) => {
  for (const h of document.querySelectorAll(".CompareRunView .du-bois-light-collapse-header")) {
    if (h.innerText.trim() === title && (h.getAttribute("aria-expanded") === "true") !== open) {
      h.click(); return true;
    }
  }
  return false;
}
"""

# Scrolls the Metrics section's virtualized grids through all rows and reads every row, then leaves the
# grids scrolled to the first row whose key is in `focus` (the top when none is). Returns
# [[key, value per run...], ...] in display order, or null when the grids are not there (yet).
# Both grids are scrolled explicitly: the UI's own sync of the key grid can lag one scroll behind.
_READ_METRICS_JS = r"""
async (focus) => {
  const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  let section = null;
  for (const h of document.querySelectorAll(".CompareRunView .du-bois-light-collapse-header")) {
    if (h.innerText.trim() === "Metrics") section = h.closest(".du-bois-light-collapse-item");
  }
  if (!section) return null;
  const grids = section.querySelectorAll(".ReactVirtualized__Grid");
  if (grids.length < 2) return null;
  const [keyGrid, valueGrid] = grids;
  const scrollTo = async (top) => {
    for (let i = 0; i < 5; i++) {
      valueGrid.scrollTop = top;
      await frames();
      keyGrid.scrollTop = valueGrid.scrollTop;
      await frames();
      if (keyGrid.scrollTop === valueGrid.scrollTop) return;
    }
  };
  const cellsOf = grid => [...grid.querySelectorAll(".ReactVirtualized__Grid__innerScrollContainer > div")]
    .map(c => ({top: parseFloat(c.style.top), left: parseFloat(c.style.left), width: parseFloat(c.style.width),
                text: c.innerText.trim()}));
  const rows = new Map();  // top (px) -> [key, values...]
  const read = () => {
    for (const c of cellsOf(keyGrid)) {
      if (!rows.has(c.top)) rows.set(c.top, [c.text]);
      else rows.get(c.top)[0] = c.text;
    }
    for (const c of cellsOf(valueGrid)) {
      if (!rows.has(c.top)) rows.set(c.top, [null]);
      rows.get(c.top)[1 + Math.round(c.left / c.width)] = c.text;
    }
  };
  const step = Math.max(45, valueGrid.clientHeight - 45);
  for (let top = 0, guard = 0; guard < 10000; guard++) {
    await scrollTo(top);
    read();
    if (top + valueGrid.clientHeight >= valueGrid.scrollHeight) break;
    top += step;
  }
  const table = [...rows.entries()].sort((a, b) => a[0] - b[0]);
  const first = table.find(([, row]) => (focus || []).includes(row[0]));
  await scrollTo(first ? first[0] : 0);
  return table.map(([, row]) => row);
}
"""

# The element that actually scrolls the page content, and how much taller its content is than its box.
_OVERFLOW_JS = r"""
() => {
  let el = document.querySelector(".CompareRunView");
  let extra = Math.max(0, document.documentElement.scrollHeight - window.innerHeight);
  for (; el; el = el.parentElement) {
    const oy = getComputedStyle(el).overflowY;
    if ((oy === "auto" || oy === "scroll") && el.scrollHeight > el.clientHeight + 1) {
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
    }
  }
  return extra;
}
"""


def compare_runs_screenshot(tracking_uri: str, experiment_id: str, run_ids: list[str], out: Path, *,
                            metrics: list[str] | None = None, timeout_s: float = 60) -> str:
    """Open the MLflow UI's compare-runs view of `run_ids`, wait until it shows the runs (ids and names in
    "Run details") and every metric key in `metrics` (default: every metric the runs have, read from the
    tracking server's REST API) in the Metrics table, save a full-page PNG at `out` (1600 px wide, at least
    1000 tall: grown to the content) and return the page's visible text (`document.body.innerText`) followed
    by `METRICS_HEADER` and the Metrics table's rows, one per line, `key\\tvalue_run1\\tvalue_run2...`,
    values as the UI formats them (`format_metric`). The Metrics grid shows ~6.7 rows at a time: the
    screenshot shows it scrolled to the first row (in the UI's order, by key) that is in `metrics`.

    Raises `CompareRunsPageError` naming the URL and what did not appear within `timeout_s` seconds (or the
    error the page showed), after saving the screenshot anyway for debugging. `timeout_s` bounds the page
    load and the wait; the browser's start (~1 s) and the screenshot (~1 s) come on top.
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    url = compare_runs_url(tracking_uri, experiment_id, run_ids)
    deadline = time.monotonic() + timeout_s

    try:
        runs = [_get_run(tracking_uri, r) for r in run_ids]
    except OSError as exc:  # HTTPError 404 for an unknown run id, URLError for no server
        raise CompareRunsPageError(f"MLflow compare-runs page {url}: cannot read the runs from "
                                   f"{tracking_uri}'s REST API: {exc}") from None
    names = [r["info"].get("run_name", "") for r in runs]
    if metrics is None:
        metrics = sorted({m["key"] for r in runs for m in r["data"].get("metrics", [])})
    metrics = list(metrics)

    server = urllib.parse.urlsplit(tracking_uri)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise RuntimeError("no system Chromium on PATH (make system-deps: apt-get install chromium)")
    args = ["--disable-dev-shm-usage", f"--explicitly-allowed-ports={server.port or 80}"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root

    blocked: list[str] = []
    errors: list[str] = []

    def route(r):
        parts = urllib.parse.urlsplit(r.request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != server.netloc:
            blocked.append(r.request.url)
            return r.abort()
        return r.continue_()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1, locale="en-US", color_scheme="light")
            page.route("**/*", route)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("response", lambda r: r.status >= 500 and errors.append(f"HTTP {r.status} {r.url}"))

            def fail(what: str, state: dict | None) -> CompareRunsPageError:
                try:
                    page.screenshot(path=str(out), full_page=True)
                    shot = f"screenshot saved at {out}"
                except PlaywrightError as exc:
                    shot = f"no screenshot ({exc})"
                details = [f"{what}; {shot}"]
                if blocked:
                    details.append(f"blocked non-loopback requests: {blocked[:5]}")
                if errors:
                    details.append("; ".join(errors[:5]))
                if state and state.get("text"):
                    details.append("page text:\n" + state["text"][:1500])
                return CompareRunsPageError(f"MLflow compare-runs page {url}: " + "\n".join(details))

            try:
                page.goto(url, wait_until="domcontentloaded", timeout=max(1.0, deadline - time.monotonic()) * 1000)
            except PlaywrightError as exc:
                raise fail(f"did not load ({exc.message.splitlines()[0]})", None) from None

            # 1. the view with both runs: ids in the header row, names in "Run Name:"
            state: dict = {}
            table: list[list[str]] | None = None
            missing: list[str] = ["the compare view (.CompareRunView)"]
            try:
                while True:
                    state = page.evaluate(_PROBE_JS)
                    if state.get("failed"):
                        raise fail("the page shows an error", state)
                    if state["view"]:
                        missing = [f"run id {r}" for r in run_ids if r not in state["runIds"]]
                        missing += [f"run name {n!r}" for n in names if n and n not in state["runNames"]]
                        if not missing:
                            sections = state["sections"]
                            if "Metrics" in sections and not sections["Metrics"]:
                                page.evaluate(_SET_SECTION_JS, ["Metrics", True])
                            if metrics and state["noMetrics"]:
                                missing = ["any metric (the page says 'No metrics to display.')"]
                            elif metrics:
                                table = page.evaluate(_READ_METRICS_JS, metrics)
                                shown = {row[0] for row in table or []}
                                missing = [f"metric {m!r}" for m in metrics if m not in shown]
                                if table is None:
                                    missing.insert(0, "the Metrics table")
                            else:
                                table = page.evaluate(_READ_METRICS_JS, []) or []
                    if not missing:
                        break
                    if time.monotonic() > deadline:
                        raise fail(f"not shown within {timeout_s:g} s: {', '.join(missing)}", state)
                    page.wait_for_timeout(200)
            except PlaywrightError as exc:  # the page crashed or navigated away mid-wait
                raise fail(f"browser error while waiting: {exc.message.splitlines()[0]}", state) from None

            # 2. layout for the picture: no plots, no assistant panel, viewport as tall as the content
            page.evaluate(_SET_SECTION_JS, ["Visualizations", False])
            close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
            if close.count() and close.first.is_visible():
                close.first.click()
            page.wait_for_timeout(300)  # the collapse animation
            height = VIEWPORT["height"]
            for _ in range(3):
                extra = page.evaluate(_OVERFLOW_JS)
                if extra <= 0 or height >= MAX_HEIGHT:
                    break
                height = min(MAX_HEIGHT, height + extra)
                page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
                page.wait_for_timeout(100)
            page.screenshot(path=str(out), full_page=True)
            text = page.evaluate("document.body.innerText")
        finally:
            browser.close()

    rows = "\n".join("\t".join(cell or "" for cell in row) for row in table or [])
    return f"{text}\n{METRICS_HEADER}\n{rows}\n"
