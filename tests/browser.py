"""Screenshots of MLflow's UI for tests: the "compare runs" view and an experiment's runs table, in headless
Chromium via Playwright (`experiment_runs_screenshot` is described at its definition).

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

import contextlib
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
MAX_WIDTH = 2400  # px: `experiment_runs_screenshot` grows the viewport this far for a wide runs table
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


@contextlib.contextmanager
def _mlflow_page(tracking_uri: str, url: str, out: Path, error: type[AssertionError], title: str, deadline: float):
    """The system Chromium, headless, on `url` of the MLflow UI at `tracking_uri`: yields (page, fail), where
    `fail(what, state)` saves a screenshot at `out` and returns an `error` naming `title`, the URL, what is
    missing, blocked requests, page errors and the page's text. Requests to any other host than the tracking
    server's are aborted (and listed); the server's port is explicitly allowed."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

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

            def fail(what: str, state: dict | None) -> AssertionError:
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
                return error(f"{title} {url}: " + "\n".join(details))

            try:
                page.goto(url, wait_until="domcontentloaded", timeout=max(1.0, deadline - time.monotonic()) * 1000)
            except PlaywrightError as exc:
                raise fail(f"did not load ({exc.message.splitlines()[0]})", None) from None
            yield page, fail
        finally:
            browser.close()


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

    with _mlflow_page(tracking_uri, url, out, CompareRunsPageError, "MLflow compare-runs page", deadline) as (page, fail):

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

    rows = "\n".join("\t".join(cell or "" for cell in row) for row in table or [])
    return f"{text}\n{METRICS_HEADER}\n{rows}\n"


# ------------------------------------------------------------------------------------ experiment page


class ExperimentRunsPageError(AssertionError):
    """The experiment's runs table did not show what was expected in time (message: URL, what is missing)."""


def experiment_runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The URL of an experiment's "Runs" tab in the MLflow 3.17 UI (`Routes.experimentPageTabRuns`,
    `/experiments/:experimentId/runs`). `workflowType=machine_learning` selects the "Model training" side of
    the UI: without it a first visit (nothing in localStorage) lands on the GenAI overview of the experiment
    (`#/experiments/ID` redirects to `/overview/usage?workflowType=genai`), which has no runs table."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{urllib.parse.quote(str(experiment_id))}/runs" \
           "?workflowType=machine_learning"


# One look at the runs table: its rows in display order (row-index), each with the run id, the name, how far
# the name is indented (a child run's name sits one expander width to the right of its parent's) and whether
# its name cell has an expander button (a parent run with children), and the tag columns shown.
_RUNS_PROBE_JS = r"""
() => {
  const text = document.body ? document.body.innerText : "";
  const failed = /Experiment not found|Error while loading|Request failed|Something went wrong/i.test(text);
  const rows = [];
  for (const cell of document.querySelectorAll('.ag-row [col-id="attributes.`Run Name`"]')) {
    const row = cell.closest(".ag-row");
    const link = cell.querySelector('a[href*="/runs/"]');
    if (!row || !link) continue;
    const name = link.innerText.trim();
    rows.push({id: row.getAttribute("row-id"), index: Number(row.getAttribute("row-index")), name,
               indent: link.getBoundingClientRect().left - cell.getBoundingClientRect().left,
               expander: !!cell.querySelector("button")});
  }
  rows.sort((a, b) => a.index - b.index);
  const headers = [...document.querySelectorAll(".ag-header-cell")].map(h => h.innerText.trim()).filter(Boolean);
  // how many px the widest text of each column to fit is cut by (ellipsis): the run names, the tag columns
  const cut = {};
  const fit = '.ag-row .ag-cell[col-id="attributes.`Run Name`"], .ag-row .ag-cell[col-id^="tags."]';
  for (const cell of document.querySelectorAll(fit)) {
    const id = cell.getAttribute("col-id");
    let over = 0;
    for (const el of cell.querySelectorAll("a, a span, .ag-cell-value, .ag-cell-value > *")) {
      over = Math.max(over, el.scrollWidth - el.clientWidth);
    }
    cut[id] = Math.max(cut[id] || 0, over);
  }
  const center = document.querySelector(".ag-center-cols-viewport");
  const wider = center ? Math.max(0, center.scrollWidth - center.clientWidth) : 0;
  return {failed, text: text.slice(0, 3000), rows, headers, cut, wider, fullText: text};
}
"""

# Clicks the expander of the run row `runId` (its Run Name cell's button).
_EXPAND_JS = r"""
(runId) => {
  for (const row of document.querySelectorAll(`.ag-row[row-id="${runId}"]`)) {
    const button = row.querySelector('[col-id="attributes.`Run Name`"] button');
    if (button) { button.click(); return true; }
  }
  return false;
}
"""

# Ticks the tag `key` in the open "Columns" selector (searched for already): the tree lists the matches
# under their group ("Attributes", "Metrics", "Parameters", "Tags (N)"); the node after "Tags" is clicked.
_TICK_TAG_COLUMN_JS = r"""
(key) => {
  let group = null;
  for (const node of document.querySelectorAll('[data-testid="column-selector-tree"] .du-bois-light-tree-treenode')) {
    const title = (node.querySelector(".du-bois-light-tree-title") || node).innerText.trim();
    const m = /^(Attributes|Metrics|Parameters|Tags)( \(\d+\))?$/.exec(title);
    if (m) { group = m[1]; continue; }
    if (group === "Tags" && title === key) {
      const box = node.querySelector(".du-bois-light-tree-checkbox");
      if (!box) return false;
      if (!box.className.includes("checked")) box.click();
      return true;
    }
  }
  return false;
}
"""

# How much blank space the runs table has right of its last column (0 when it scrolls sideways).
_RUNS_SLACK_JS = r"""
() => {
  const view = document.querySelector(".ag-center-cols-viewport");
  const cols = document.querySelector(".ag-center-cols-container");
  return view && cols ? Math.max(0, view.clientWidth - cols.getBoundingClientRect().width) : 0;
}
"""

# How much taller the runs table's content is than its scrolling boxes (the grid's body, the page shell).
_RUNS_OVERFLOW_JS = r"""
() => {
  let extra = Math.max(0, document.documentElement.scrollHeight - window.innerHeight);
  for (let el = document.querySelector(".ag-body-viewport"); el; el = el.parentElement) {
    const oy = getComputedStyle(el).overflowY;
    if ((oy === "auto" || oy === "scroll") && el.scrollHeight > el.clientHeight + 1) {
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
    }
  }
  return extra;
}
"""


def experiment_runs_screenshot(tracking_uri: str, experiment_id: str, out: Path, *, expect: list[str],
                               expand: str | None = None, tag_columns: list[str] | None = None,
                               timeout_s: float = 60) -> str:
    """Open the MLflow UI's runs table of an experiment (`experiment_runs_url`: the "Runs" tab, "Model
    training" side), optionally expand a parent run and add tag columns, wait until every string of `expect`
    is in the page's text, save a PNG at `out` and return that text (`document.body.innerText`, taken after the
    screenshot). Note that innerText holds a cell's whole text even where the cell shows it cut with an
    ellipsis, and only the rows the grid has rendered (all of them here, see the layout below).

    What the page shows (MLflow 3.17.2): the experiment's runs, newest first, one row each (Run Name, Created,
    Dataset, Duration, Source, Models; the innerText of a row also holds its color, e.g. `#de7921`); child runs
    (tag `mlflow.parentRunId`) are not rows of their own but nested under their parent, whose name cell has an
    expander button, collapsed on a first visit (indented one step further once expanded). The "MLflow
    Assistant" side panel, open on a first visit, is closed here so the table gets the width.

    - `expand`: the name of a parent run. The first row with that name (in the table's order) that has child
      runs is expanded by clicking its expander, once its row is there; the wait goes on until the rows
      after it are indented deeper (its children). A row of that name without children (a workflow re-run in
      which every step was cached) is passed over.
    - `tag_columns`: tag keys to show as columns, ticked in the table's "Columns" selector (search, then the
      key under "Tags"), e.g. `xsam.workflow.step`: the column headers are the keys.
    - Layout for the picture, once all of the above is there: the viewport (1600 x 1000 px to start) is grown
      to the table's height (up to `MAX_HEIGHT`: the grid renders only the rows in its box, and the page lays
      out in a fixed-height shell, so a plain full-page screenshot would show one screenful) and to its width
      (up to `MAX_WIDTH`: no column is scrolled out of view on the right); then the Run Name column and the tag
      columns are widened (their header's resize handle dragged, at most 400 px each) until none of their
      visible cells is cut with an ellipsis (the Dataset column keeps its width: its dataset digests are cut),
      and the viewport's width is fitted to the table again. Only then are the `expect` strings looked for.

    Raises `ExperimentRunsPageError` naming the URL and what did not appear within `timeout_s` seconds (no run
    rows, a tag column, no row named `expand` or none with children, the children, `expect` strings), or the
    error the page showed, after saving the screenshot anyway for debugging; for an experiment id the tracking
    server's REST API does not know (or no server), before any browser starts. `timeout_s` bounds the page
    load and the wait; the browser's start and the screenshot (~1-2 s) come on top. Requests to any other
    host than the tracking server's are aborted, as in `compare_runs_screenshot`.
    """
    from playwright.sync_api import Error as PlaywrightError

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    url = experiment_runs_url(tracking_uri, experiment_id)
    deadline = time.monotonic() + timeout_s
    expect = [str(e) for e in expect]
    tag_columns = [str(t) for t in tag_columns or []]

    api = (f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/get"
           f"?experiment_id={urllib.parse.quote(str(experiment_id))}")
    try:
        with urllib.request.urlopen(api, timeout=30) as resp:
            json.load(resp)
    except OSError as exc:  # HTTPError 404 for an unknown experiment, URLError for no server
        raise ExperimentRunsPageError(f"MLflow experiment page {url}: cannot read experiment {experiment_id} "
                                      f"from {tracking_uri}'s REST API: {exc}") from None

    with _mlflow_page(tracking_uri, url, out, ExperimentRunsPageError, "MLflow experiment page", deadline) as (page, fail):

        state: dict = {}
        expanded: str | None = None  # the run id whose expander was clicked
        columns_done: set[str] = set()
        widened = False
        width, height = VIEWPORT["width"], VIEWPORT["height"]
        try:
            while True:
                state = page.evaluate(_RUNS_PROBE_JS)
                if state.get("failed"):
                    raise fail("the page shows an error", state)
                rows = state["rows"]
                missing: list[str] = []
                if not rows:
                    missing.append("the runs table (no run rows)")
                else:
                    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
                    if close.count() and close.first.is_visible():
                        close.first.click()
                    for key in tag_columns:
                        if key in state["headers"]:
                            continue
                        if key not in columns_done:  # open the selector, search the key, tick it, close
                            columns_done.add(key)
                            page.locator('[data-testid="column-selection-dropdown"]').first.click()
                            search = page.locator('input[placeholder="Search columns"]')
                            search.fill(key, timeout=max(1.0, deadline - time.monotonic()) * 1000)
                            page.wait_for_timeout(300)
                            if not page.evaluate(_TICK_TAG_COLUMN_JS, key):
                                columns_done.discard(key)  # the tree has not caught up: again next round
                            page.keyboard.press("Escape")
                        missing.append(f"the tag column {key!r}")
                    if expand is not None:
                        if expanded is None:
                            parent = next((r for r in rows if r["name"] == expand and r["expander"]), None)
                            if parent and page.evaluate(_EXPAND_JS, parent["id"]):
                                expanded = parent["id"]
                        if expanded is None:
                            named = [r for r in rows if r["name"] == expand]
                            missing.append(f"a run row named {expand!r} with child runs (an expander)" if named
                                           else f"a run row named {expand!r}")
                        else:
                            at = next((i for i, r in enumerate(rows) if r["id"] == expanded), None)
                            if at is None or at + 1 >= len(rows) or rows[at + 1]["indent"] <= rows[at]["indent"]:
                                missing.append(f"the child runs of {expand!r} (run {expanded}) under it")
                    if not missing:  # the layout for the picture, one change per round
                        extra = page.evaluate(_RUNS_OVERFLOW_JS)
                        if extra > 0 and height < MAX_HEIGHT:  # all rows rendered before measuring
                            height = min(MAX_HEIGHT, height + extra)
                            page.set_viewport_size({"width": width, "height": height})
                            page.wait_for_timeout(200)
                            continue
                        if state["wider"] > 0 and width < MAX_WIDTH:  # every column in view
                            width = min(MAX_WIDTH, width + state["wider"])
                            page.set_viewport_size({"width": width, "height": height})
                            page.wait_for_timeout(200)
                            continue
                        if not widened:
                            widened = True
                            cut = {k: min(400, v + 16) for k, v in state["cut"].items() if v > 0}
                            if cut:  # room first: a resize handle is dragged within the window
                                page.set_viewport_size({"width": width + sum(cut.values()), "height": height})
                                for col_id, px in cut.items():
                                    _widen_column(page, col_id, px)
                                slack = page.evaluate(_RUNS_SLACK_JS)  # blank right of the last column
                                width = max(width, width + sum(cut.values()) - slack)
                                page.set_viewport_size({"width": width, "height": height})
                                page.wait_for_timeout(200)
                                continue
                    missing += [f"text {e!r}" for e in expect if e not in state["fullText"]]
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise fail(f"not shown within {timeout_s:g} s: {', '.join(missing)}", state)
                page.wait_for_timeout(200)
        except PlaywrightError as exc:  # the page crashed or navigated away mid-wait
            raise fail(f"browser error while waiting: {exc.message.splitlines()[0]}", state) from None

        page.mouse.move(0, height - 1)  # no hover highlight or tooltip on a row
        page.wait_for_timeout(300)
        page.screenshot(path=str(out), full_page=True)
        text = page.evaluate("document.body.innerText")
    return text


def _widen_column(page, col_id: str, by: float) -> None:
    """Drag the resize handle of the runs table's column `col_id` `by` px to the right. The handle's right
    half lies under the next header's content, so the drag starts 2 px into it."""
    handle = page.locator(f'.ag-header-cell[col-id="{col_id}"] .ag-header-cell-resize').first
    box = handle.bounding_box() if handle.count() else None
    if box is None:
        return
    x, y = box["x"] + 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(x + by * i / 10, y)
        page.wait_for_timeout(20)
    page.mouse.up()
    page.wait_for_timeout(200)
