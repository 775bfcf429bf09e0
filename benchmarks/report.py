"""The benchmarks' plots and the summary at the top of docs/benchmarks.md, from their JSON results.

    .venv/bin/python benchmarks/report.py [--results DIR] [--write-docs]

`make bench` runs convert.py, loader.py, train.py and eval.py with `--json DIR/NAME.json` (DIR:
benchmarks/out/results), then this script, which reads what is there and draws, under docs/images/:

- bench-convert.png: conversion / Ray copy floor (samples/s ratio) for 1 and 2 workers with the
  mandated-work bound, and the per-core rate;
- bench-loader.png: loader / plain decode loop (items/s ratio) per image size, 2 and 0 workers;
- bench-loader-memory.png: peak memory of the loader over N and 10N records;
- bench-loader-first-batch.png: time to the first batch against the number of shards;
- bench-train.png: training samples/s per configuration and the share of each step spent waiting for data;
- bench-eval.png: evaluation items/s as a ratio to the plain prediction loop, and where a unit's time goes;

and (`--write-docs`) replaces the summary block of docs/benchmarks.md: one row per headline ratio, each
with its machine and the date of its run, and the plots. A result file that is missing leaves its rows as
"not run" and its plots out. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import DOCS, IMAGES, REPO, shown, write_block

BEGIN, END = "<!-- bench:summary:begin -->", "<!-- bench:summary:end -->"
RESULTS = REPO / "benchmarks" / "out" / "results"
NAMES = ("convert", "loader", "train", "eval")
COLORS = {"w1": "tab:blue", "w2": "tab:orange", "w0": "tab:gray", "target": "tab:red"}


def machine_text(m: dict[str, str]) -> str:
    return f"{m['nproc']} CPUs ({m['cpu']})"


def title(fig: Any, text: str, result: dict[str, Any]) -> None:
    fig.suptitle(f"{text}\n{machine_text(result['machine'])}, Python {result['machine']['python']}; "
                 f"{result['measured']}; ratios measured in one run", fontsize=10)


def _errors(values: list[tuple[float, float, float]]) -> list[list[float]]:
    """matplotlib's asymmetric error bars from (median, min, max)."""
    return [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]


def _label_bars(ax: Any, bars: Any, texts: list[str], tops: list[float] | None = None) -> None:
    """Each bar's value above it (above its whisker when TOPS gives the whiskers' ends)."""
    for k, (bar, text) in enumerate(zip(bars, texts)):
        top = max(bar.get_height(), tops[k]) if tops else bar.get_height()
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)


def _new(ncols: int, width: float = 11.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, 4.6), dpi=100)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- plots ------------------------------------------------------------------------------------


def plot_convert(result: dict[str, Any], path: Path) -> Path:
    """Left: convert / Ray copy per corpus and verify mode, 1 and 2 workers, and the mandated-work bound
    (black line). Right: samples/s per core."""
    rows = [r for r in result["rows"] if r["workers"] > 0]
    groups = list(dict.fromkeys((r["case"], r["verify"]) for r in rows))
    workers = sorted({r["workers"] for r in rows})
    fig, (left, right) = _new(2, 12)
    width = 0.8 / len(workers)
    for k, w in enumerate(workers):
        chosen = [next((r for r in rows if (r["case"], r["verify"]) == g and r["workers"] == w), None) for g in groups]
        xs = [i + (k - (len(workers) - 1) / 2) * width for i in range(len(groups))]
        ratio = [(r["ratio"], r["ratio_min"], r["ratio_max"]) if r else (0, 0, 0) for r in chosen]
        bars = left.bar(xs, [v[0] for v in ratio], width, yerr=_errors(ratio), capsize=3,
                        color=COLORS.get(f"w{w}", None), label=f"{w} worker{'s' if w > 1 else ''}")
        _label_bars(left, bars, [f"{v[0]:.3f}" for v in ratio], [v[2] for v in ratio])
        bars = right.bar(xs, [r["per_core_sps"] if r else 0 for r in chosen], width, color=COLORS.get(f"w{w}"),
                         label=f"{w} worker{'s' if w > 1 else ''}")
        _label_bars(right, bars, [f"{r['per_core_sps']:.0f}" if r else "" for r in chosen])
    names = [f"{case}\n{verify}" for case, verify in groups]
    bounds = {(r["case"], r["verify"]): r.get("bound_ratio") for r in result["rows"] if r["workers"] == 0}
    marks = [(i, bounds.get(g)) for i, g in enumerate(groups) if bounds.get(g)]
    if marks:  # the most a conversion doing the mandated work can reach (CPU time, same run)
        left.hlines([b for _, b in marks], [i - 0.45 for i, _ in marks], [i + 0.45 for i, _ in marks],
                    colors="black", lw=2, label="mandated-work bound / copy (CPU time; values in the table)")
    left.axhline(0.5, color=COLORS["target"], ls="--", lw=1, label="target 0.5 (structural)")
    left.set_xticks(range(len(groups)), names, fontsize=8)
    left.set_ylabel("convert samples/s ÷ Ray copy samples/s\n(same workers, same shards, same run)")
    left.set_xlabel("corpus and --verify mode")
    left.set_title("conversion as a ratio to copying the image bytes into tar files", fontsize=9)
    left.set_ylim(0, max(0.75, max([r["ratio_max"] for r in rows] + [b for _, b in marks]) * 1.25))  # legend above 0.5
    left.legend(fontsize=8, loc="upper right")
    right.axhline(300, color=COLORS["target"], ls="--", lw=1, label="target 300/core (structural)")
    right.set_xticks(range(len(groups)), names, fontsize=8)
    right.set_ylabel("convert samples/s per worker")
    right.set_xlabel("corpus and --verify mode")
    right.set_title("conversion rate per core (wall clock, through Ray)", fontsize=9)
    right.set_ylim(0, max(330, max(r["per_core_sps"] for r in rows) * 1.2))
    right.legend(fontsize=8)
    title(fig, "Conversion throughput (benchmarks/convert.py; bars: median of the repeats, whiskers: min-max)", result)
    return _save(fig, path)


def plot_loader(result: dict[str, Any], path: Path) -> Path:
    """Loader / plain loop per image size, for each worker count."""
    rows = [r for r in result["throughput"] if "ratio" in r]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    workers = sorted({r["workers"] for r in rows}, reverse=True)
    fig, ax = _new(1, 7.5)
    width = 0.8 / len(workers)
    for k, w in enumerate(workers):
        chosen = [next(r for r in rows if r["size"] == s and r["workers"] == w) for s in sizes]
        xs = [i + (k - (len(workers) - 1) / 2) * width for i in range(len(sizes))]
        vals = [(r["ratio"], r["ratio_min"], r["ratio_max"]) for r in chosen]
        bars = ax.bar(xs, [v[0] for v in vals], width, yerr=_errors(vals), capsize=3, color=COLORS.get(f"w{w}"),
                      label=f"StreamLoader, {w} worker process{'es' if w != 1 else ''}")
        _label_bars(ax, bars, [f"{v[0]:.2f}" for v in vals], [v[2] for v in vals])
    ax.axhline(1.0, color="0.3", lw=0.8)
    ax.axhline(1.5, color=COLORS["target"], ls="--", lw=1, label="target 1.5 (2 workers)")
    ax.set_xticks(range(len(sizes)), [f"{s} px\n(vision / seg input)" for s in sizes], fontsize=8)
    ax.set_ylabel("loader items/s (steady) ÷ plain loop items/s\n(build + collate in one process, same items)")
    ax.set_ylim(0, max(2.2, max(r["ratio_max"] for r in rows) * 1.2))
    ax.legend(fontsize=8, loc="upper right")
    title(fig, "Training data stream (benchmarks/loader.py; median of the repeats, whiskers: min-max)", result)
    return _save(fig, path)


def plot_memory(result: dict[str, Any], path: Path) -> Path:
    """Peak memory at N and 10N records: main process, largest worker, the whole tree's PSS."""
    rss = sorted(result["rss"].values(), key=lambda r: r["records"])
    metrics = [("self_maxrss_kb", "main process\npeak RSS"), ("worker_maxrss_kb", "largest worker\npeak RSS"),
               ("tree_pss_kb", "main + workers\npeak PSS (summed)")]
    fig, ax = _new(1, 7.5)
    width = 0.8 / len(rss)
    for k, r in enumerate(rss):
        xs = [i + (k - (len(rss) - 1) / 2) * width for i in range(len(metrics))]
        bars = ax.bar(xs, [r[m] for m, _ in metrics], width, color=["tab:blue", "tab:orange"][k % 2],
                      label=f"{r['records']:,} records in {r['shards']} shards")
        _label_bars(ax, bars, [f"{r[m]:.0f}" for m, _ in metrics])
    ax.set_xticks(range(len(metrics)), [name for _, name in metrics], fontsize=8)
    ax.set_ylabel("peak memory, MiB")
    ax.set_ylim(0, max(r[m] for r in rss for m, _ in metrics) * 1.25)
    ax.legend(fontsize=8, loc="upper right")
    items = rss[0]["items"]
    title(fig, f"Loader peak memory at 1x and 10x records (2 workers, {items} items consumed, one run each)", result)
    return _save(fig, path)


def plot_first_batch(result: dict[str, Any], path: Path) -> Path:
    """Time to the first batch against the shard count, one line per builder."""
    rows = result["ttfb"]
    size = result["args"]["sizes"][0]
    fig, ax = _new(1, 7.5)
    names = {"keys": "KeysOnly builder (no decoding)", "full": f"XSamBuilder {size}"}
    for builder, color in (("keys", "tab:blue"), ("full", "tab:orange")):
        line = sorted((r for r in rows if r["builder"] == builder), key=lambda r: r["shards"])
        if not line:
            continue
        vals = [(r["first_s"], r["first_min"], r["first_max"]) for r in line]
        ax.errorbar([r["shards"] for r in line], [v[0] for v in vals], yerr=_errors(vals), marker="o", capsize=3,
                    color=color, label=names[builder])
    for r in (r for r in rows if r["builder"] == "preloaded"):
        ax.plot([r["shards"]], [r["first_s"]], marker="*", ms=11, ls="none", color="tab:green",
                label=f"XSamBuilder {size}, tokenizer loaded before (not counted)")
    ax.set_xscale("log")
    shards = sorted({r["shards"] for r in rows})
    ax.set_xticks(shards, [f"{s:,}" for s in shards])
    ax.set_xlabel(f"shards holding the same {result['args']['ttfb_records']:,} records (log scale)")
    ax.set_ylabel("seconds from constructing StreamLoader\nto the first batch (2 workers)")
    ax.set_ylim(0, max(r["first_max"] for r in rows) * 1.3)
    ax.legend(fontsize=8, loc="upper left")
    title(fig, f"Time to first batch vs number of shards\n(fresh process, empty shard cache; median of "
               f"{result['args']['ttfb_repeats']}, whiskers: min-max)", result)
    return _save(fig, path)


def plot_train(result: dict[str, Any], path: Path) -> Path:
    """Left: job-wide samples/s per configuration. Right: the data-wait share, overall and within epochs."""
    rows = result["runs"]
    a = result["args"]
    names = [f"{r['world']} Ray Train\nworker{'s' if r['world'] > 1 else ''},\ndata.num_workers={r['loader_workers']}"
             for r in rows]
    fig, (left, right) = _new(2, 12)
    xs = list(range(len(rows)))
    vals = [(r["samples_per_s"], r["samples_min"], r["samples_max"]) for r in rows]
    bars = left.bar(xs, [v[0] for v in vals], 0.6, yerr=_errors(vals), capsize=3, color="tab:blue")
    _label_bars(left, bars, [f"{v[0]:.2f}" for v in vals], [v[2] for v in vals])
    left.set_xticks(xs, names, fontsize=8)
    left.set_ylabel(f"samples/s, job-wide (median of steps {a['warmup'] + 1}-{a['steps']})")
    left.set_title(f"training throughput; 2 / 1 workers = {result['scaling']:.2f}x (same run)", fontsize=9)
    left.set_ylim(0, max(v[2] for v in vals) * 1.2)
    width = 0.38
    share = right
    b1 = share.bar([x - width / 2 for x in xs], [100 * r["wait_share"] for r in rows], width, color="tab:red",
                   label=f"steps {a['warmup'] + 1}-{a['steps']}")
    b2 = share.bar([x + width / 2 for x in xs], [100 * (r["within_share"] or 0) for r in rows], width,
                   color="tab:pink", label="the same without each epoch's first step")
    _label_bars(share, b1, [f"{100 * r['wait_share']:.1f}%" for r in rows])
    _label_bars(share, b2, [f"{100 * (r['within_share'] or 0):.1f}%" for r in rows])
    share.axhline(100 * 0.05, color="0.2", ls="--", lw=1, label="target < 5%")
    share.set_xticks(xs, names, fontsize=8)
    share.set_ylabel("data wait ÷ step time (%, rank 0)")
    share.set_title("share of each step spent waiting for data", fontsize=9)
    share.set_ylim(0, max(7.0, max(100 * r["wait_share"] for r in rows) * 1.3))
    share.legend(fontsize=8, loc="upper left")
    title(fig, "Training, tiny stage-3 on Ray Train + DeepSpeed ZeRO-2, CPU (benchmarks/train.py)", result)
    return _save(fig, path)


def plot_eval(result: dict[str, Any], path: Path) -> Path:
    """Left: job items/s over the plain loop's, per kind and actor count (steady and end to end). Right: the
    plain loop's time per item by stage."""
    kinds = result["kinds"]
    fig, (left, right) = _new(2, 12)
    actors = sorted({j["actors"] for k in kinds for j in k["jobs"]})
    series = [(a, "ratio", "steady") for a in actors] + [(a, "end_to_end_ratio", "end to end") for a in actors]
    width = 0.8 / len(series)
    colors = {("steady", 1): "tab:blue", ("steady", 2): "tab:orange", ("end to end", 1): "lightsteelblue",
              ("end to end", 2): "navajowhite"}
    for k, (a, key, name) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(kinds))]
        vals = []
        for kind in kinds:
            j = next((j for j in kind["jobs"] if j["actors"] == a), None)
            s = j[key] if j else None
            vals.append((s["median"], s["min"], s["max"]) if s else (0.0, 0.0, 0.0))
        bars = left.bar(xs, [v[0] for v in vals], width, yerr=_errors(vals), capsize=3, color=colors[(name, a)],
                        label=f"job, {a} actor{'s' if a > 1 else ''}, {name}")
        _label_bars(left, bars, [f"{v[0]:.2f}" if v[0] else "-" for v in vals], [v[2] for v in vals])
    left.axhline(1.0, color="0.3", lw=0.8, ls="--", label="plain loop (1 process, no Ray) = 1")
    left.set_xticks(range(len(kinds)), [f"{k['kind']}\n{k['benchmark']}, {k['units']} items" for k in kinds],
                    fontsize=8)
    left.set_ylabel("xsam eval items/s ÷ plain loop items/s\n(same units, same run)")
    top = max([v["max"] for k in kinds for j in k["jobs"] for v in (j["ratio"], j["end_to_end_ratio"]) if v] + [1.0])
    left.set_ylim(0, top * 1.3)
    left.set_title("evaluation throughput (steady: the actors' own time after start-up)", fontsize=9)
    left.legend(fontsize=7, loc="upper left")
    stages = list(kinds[0]["plain"]["stages_ms"])
    stage_names = result.get("stage_names", {})
    stage_colors = ["tab:gray", "tab:olive", "tab:cyan", "tab:blue", "tab:red"]
    bottoms = [0.0] * len(kinds)
    for stage, color in zip(stages, stage_colors):
        values = [k["plain"]["stages_ms"][stage] for k in kinds]
        right.bar(range(len(kinds)), values, 0.5, bottom=bottoms, color=color, label=stage_names.get(stage, stage))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, k in enumerate(kinds):
        right.annotate(f"{bottoms[i]:.0f} ms = {k['plain']['items_per_s']:.2f} items/s\npost-processing "
                       f"{k['plain']['stage_share']['post']:.0%}", (i, bottoms[i]), xytext=(0, 3),
                       textcoords="offset points", ha="center", va="bottom", fontsize=7)
    right.set_xticks(range(len(kinds)), [k["kind"] for k in kinds], fontsize=8)
    right.set_ylabel("ms per item in the plain loop (1 torch thread)")
    right.set_ylim(0, max(bottoms) * 1.7)  # room for the labels and, above them, the legend
    right.set_title("where an item's time goes (tiny model, random init)", fontsize=9)
    right.legend(fontsize=7, loc="upper center", ncol=3)
    title(fig, "Evaluation (benchmarks/eval.py; median of the repeats, whiskers: min-max)", result)
    return _save(fig, path)


PLOTS = {
    "convert": [("bench-convert.png", plot_convert, "conversion / Ray copy floor, 1 and 2 workers, with the mandated-work bound, and the per-core rate")],
    "loader": [("bench-loader.png", plot_loader, "loader / plain decode loop per image size"),
               ("bench-loader-memory.png", plot_memory, "loader peak memory at 1x and 10x records"),
               ("bench-loader-first-batch.png", plot_first_batch, "time to first batch against the number of shards")],
    "train": [("bench-train.png", plot_train, "training samples/s and data-wait share")],
    "eval": [("bench-eval.png", plot_eval, "evaluation items/s over the plain prediction loop, and a unit's stages")],
}


# ---- the summary --------------------------------------------------------------------------------


def _row(bench: str, what: str, value: str, target: str, result: dict[str, Any] | None, section: str) -> str:
    where = f"{machine_text(result['machine'])}, {result['measured']}" if result else "-"
    anchor = section.lower().replace(":", "").replace(" ", "-")  # GitHub's heading anchors
    return f"| {bench} | {what} | {value} | {target} | {where} | [{section}](#{anchor}) |"


def summary_rows(results: dict[str, dict[str, Any] | None]) -> list[str]:
    rows = []
    c = results.get("convert")
    sec = "Benchmarks: conversion throughput"
    if c:
        for r in (r for r in c["rows"] if r["workers"] > 0 and r["verify"] == "structural"):
            rows.append(_row("conversion", f"convert / Ray copy, {r['case']}, {r['workers']} worker"
                             f"{'s' if r['workers'] > 1 else ''}", f"{r['ratio']:.3f} "
                             f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f})", ">= 0.5", c, sec))
        for r in (r for r in c["rows"] if r["workers"] == 0 and r["verify"] == "structural" and r.get("bound_ratio")):
            rows.append(_row("conversion", f"mandated-work bound / copy (CPU time), {r['case']}",
                             f"{r['bound_ratio']:.3f}", "the most convert / copy can reach", c, sec))
    else:
        rows.append(_row("conversion", "convert / Ray copy", "not run", ">= 0.5", None, sec))
    ld = results.get("loader")
    sec = "Benchmarks: training data stream"
    if ld:
        for r in (r for r in ld["throughput"] if r.get("workers") == 2):
            rows.append(_row("loader", f"loader (2 workers) / plain decode loop, {r['size']}",
                             f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})", ">= 1.5", ld, sec))
        rss = sorted(ld["rss"].values(), key=lambda r: r["records"])
        if len(rss) >= 2:
            small, large = rss[0], rss[-1]
            times = large["records"] // small["records"]
            rows.append(_row("loader memory", f"peak PSS of main + workers, {times}x records / 1x",
                             f"{large['tree_pss_kb'] / small['tree_pss_kb']:.2f} ({small['tree_pss_kb']:.0f} -> "
                             f"{large['tree_pss_kb']:.0f} MB)", "flat (~1)", ld, sec))
        keys = sorted((r for r in ld["ttfb"] if r["builder"] == "keys"), key=lambda r: r["shards"])
        if len(keys) >= 2:
            rows.append(_row("time to first batch", f"{keys[-1]['shards']:,} shards / {keys[0]['shards']:,} shards "
                             "(KeysOnly)", f"{keys[-1]['first_s'] / keys[0]['first_s']:.2f} ({keys[0]['first_s']:.2f} "
                             f"-> {keys[-1]['first_s']:.2f} s)", "flat (~1)", ld, sec))
    else:
        rows.append(_row("loader", "loader / plain decode loop", "not run", ">= 1.5", None, sec))
    t = results.get("train")
    sec = "Benchmarks: training"
    if t:
        for r in t["runs"]:
            rows.append(_row("training", f"data-wait share of the step, {r['world']} worker"
                             f"{'s' if r['world'] > 1 else ''}, data.num_workers={r['loader_workers']}",
                             f"{100 * r['wait_share']:.1f}% ({r['samples_per_s']:.2f} samples/s)", "< 5%", t, sec))
        rows.append(_row("training", "samples/s, 2 / 1 Ray Train workers", f"{t['scaling']:.2f}", "-", t, sec))
    else:
        rows.append(_row("training", "data-wait share", "not run", "< 5%", None, sec))
    e = results.get("eval")
    sec = "Benchmarks: evaluation"
    if e:
        for k in e["kinds"]:
            for j in k["jobs"]:
                steady = f"{j['ratio']['median']:.2f}"
                rows.append(_row("evaluation", f"xsam eval / plain loop, {k['kind']}, {j['actors']} actor"
                                 f"{'s' if j['actors'] > 1 else ''}", f"{steady} steady, "
                                 f"{j['end_to_end_ratio']['median']:.2f} end to end", "-", e, sec))
    else:
        rows.append(_row("evaluation", "xsam eval / plain loop", "not run", "-", None, sec))
    return rows


def summary(results: dict[str, dict[str, Any] | None], plots: list[tuple[str, Path, str]]) -> str:
    quick = [n for n, r in results.items() if r and r["args"].get("quick")]
    lines = [
        "Headline numbers of the last `make bench`: ratios measured in one run, each against a floor measured on the "
        "same machine in the same run (absolute rates are in the sections). Each row names its machine and when it "
        "ran.",
    ]
    if quick:
        lines[0] += (f" **{', '.join(quick)}: quick mode (`--quick`), reduced sizes to check that the benchmarks run; "
                     "not numbers to compare.**")
    lines += [
        "",
        "| benchmark | ratio | value (min-max) | target | machine, run | section |",
        "|---|---|---|---|---|---|",
        *summary_rows(results),
    ]
    if plots:
        lines += ["", "Plots (drawn by `benchmarks/report.py` from the same runs):", ""]
        for name, path, caption in plots:
            lines += [f"![{caption}]({os.path.relpath(path, DOCS.parent)})", ""]
    return "\n".join(lines).rstrip("\n")


def load(results_dir: Path) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for name in NAMES:
        path = results_dir / f"{name}.json"
        if not path.exists():
            out[name] = None
            continue
        result = json.loads(path.read_text())
        result["measured"] = "run " + time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))
        out[name] = result
    return out


def write_docs(text: str) -> None:
    write_block(BEGIN, END, text, missing=f"# Benchmarks\n\n## Summary\n\n{BEGIN}\n{END}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results", default=str(RESULTS),
                        help=f"folder of convert.json, loader.json, train.json, eval.json ({shown(RESULTS)})")
    parser.add_argument("--images", default=None, help=f"where the PNGs go (default: {shown(IMAGES)})")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the summary block of {shown(DOCS)}")
    args = parser.parse_args(argv)
    images = Path(args.images) if args.images else IMAGES
    if args.write_docs and images.resolve() != IMAGES:
        parser.error(f"--write-docs links the plots in {shown(IMAGES)}: leave out --images")
    results = load(Path(args.results))
    if not any(results.values()):
        parser.error(f"no results in {args.results}: run the benchmarks with --json {args.results}/NAME.json "
                     "(`make bench` does)")
    plots = []
    for name, specs in PLOTS.items():
        result = results.get(name)
        if not result:
            print(f"{name}: no {name}.json in {args.results}, its plots are left out", file=sys.stderr)
            continue
        for file_name, draw, caption in specs:
            plots.append((file_name, draw(result, images / file_name), caption))
            print(f"plot: {shown(images / file_name)}", file=sys.stderr)
    text = summary(results, plots)
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"(updated {shown(DOCS)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
