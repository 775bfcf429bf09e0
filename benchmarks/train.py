"""Training throughput of the tiny stage-3 recipe on Ray Train + DeepSpeed: samples/s, the share of
each step spent waiting for data, and the 1 -> 2 worker scaling, measured in one run.

    .venv/bin/python benchmarks/train.py [--steps N] [--warmup K] [--num-workers W] [--write-docs]

What runs (see docs/benchmarks.md, "Benchmarks: training"):

- inputs: the example datasets the tests train on (`tests/builders.py::build_task_world`, the same
  few lines written out here): `dataprep.examples.make_examples` over `examples/corpora` (derived
  from the real COCO samples), then llava, refcoco, reasonseg and coco-vgd converted in this
  process (prepare, every unit, finalize; no Ray) into `--out`/train-data;
- the recipe: `pipelines/recipes/tiny-stage3.yaml` (tiny model, ZeRO-2, fp32 on the CPU, global
  batch 2 of micro-batches of 1) pointed at those four datasets as `tests/jobs/test_train.py`
  does (`data.root=... data.mixture.sources=[...]`), `train.max_steps=N`, `train.epochs` enough
  for N steps, a checkpoint only at the end (`checkpoint.every_n_steps=N`: a checkpoint inside
  the measured steps would let the loader prefetch while the clock is stopped);
- one local Ray (`ray.init(num_cpus=2)`) for every run; `jobs.train.run_training` once per
  configuration, in this order: 1 worker and 2 workers with `data.num_workers=W` (the scaling
  pair), then 1 worker with the other `data.num_workers` of 0 and 1 (the loader comparison). Each
  run has its own name under `--out`/train-runs;
- from each run's `TrainingResult.steps` (rank 0's records of every optimizer step), the first
  `--warmup` steps are dropped; over the rest: the median job-wide samples/s (and per worker), and
  the data-wait share = sum(data_wait_s) / sum(step_s) (rank 0's time blocked in `next()` on the
  loader / the step's wall time), with the largest single step's share;
- the loader's own cost, in this process: rank 0 of a 1-worker job, `StreamLoader(num_workers=0)`
  with the training job's builder over one epoch: the time to produce a micro-batch (`next()`:
  decode, preprocess, tokenise, collate) and `PackedBatch.to("cpu")` (done by the training loop
  after `next()` returns, so counted as compute, not as data wait);
- the machine: CPU ticks of the whole machine (/proc/stat) and of this process's tree (Ray's GCS and
  raylet, its workers, their loader processes; /proc/PID/stat sampled every 0.5 s) over each run:
  "cores used by other processes" says how much of the cores something else took meanwhile.

Only `time.perf_counter`, /proc, Ray and the project's own code are used. Nothing is asserted on
timings: the script reports, and says whether the < 5% data-wait target was met.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import (DOCS, IMAGES, ONE_RUN, REPO, Window, busy_share, cpu_ticks, loadavg, machine_title, quick_note, shown,
                    work_folder, write_block)
from common import machine as machine_facts


BEGIN, END = "<!-- bench:train:begin -->", "<!-- bench:train:end -->"
SECTION = "# Benchmarks: training"
RECIPE = REPO / "pipelines" / "recipes" / "tiny-stage3.yaml"
CORPORA = REPO / "examples" / "corpora"
# docs/ keeps its pictures in docs/images/; the plot goes there, linked from the results block
PLOT = IMAGES / "bench-train-step-time.png"
DATASETS = ("llava", "refcoco", "reasonseg", "coco-vgd")  # tests/jobs/test_train.py::_tiny_world_recipe
TARGET_WAIT = 0.05  # data-wait share of a step
# --quick: the flags left at their defaults become these (a check that the benchmark runs; still three runs)
QUICK = {"steps": 4, "warmup": 1}


# ---- inputs -----------------------------------------------------------------------------------


def build_datasets(root: Path) -> dict[str, Path]:
    """The example datasets of `DATASETS`, converted in this process (what
    `tests/builders.py::build_task_world` does for each: make the example corpora, convert)."""
    from dataprep.convert import ConvertParams, finalize, prepare, run_unit
    from dataprep.converters import get_converter
    from dataprep.examples import corpus_of, make_examples
    from xsam.data.storage import open_storage

    found = make_examples(CORPORA, root / "examples")
    out = {}
    for name in DATASETS:
        inputs = dict(found[name])
        if name == "coco-vgd":
            inputs["split"] = "train2017"  # as build_task_world: the example is a val2017 file, trained as train
        params = ConvertParams()
        storage = open_storage(root / name)
        converter = get_converter(corpus_of(name))(**{k: str(v) for k, v in inputs.items()})
        prepared = prepare(converter, storage, params)
        results = [run_unit(converter, unit, storage, params, prepared.digest, prepared.plan.categories)
                   for unit in prepared.units]
        finalize(prepared, storage, results)
        out[name] = root / name
    shutil.rmtree(root / "examples")
    return out


def recipe_for(data_root: Path, *, steps: int, loader_workers: int, steps_per_epoch: int | None = None) -> Any:
    """tiny-stage3 over the example datasets (the overrides of `_tiny_world_recipe` in the tests)."""
    from jobs.recipe import resolve_recipe

    sources = "[" + ", ".join(f"{{name: {n}, path: {n}, repeat: sqrt}}" for n in DATASETS) + "]"
    epochs = math.ceil(steps / steps_per_epoch) if steps_per_epoch else 1
    overrides = [
        f"data.root={data_root}", f"data.mixture.sources={sources}", f"data.num_workers={loader_workers}",
        f"train.max_steps={steps}", f"train.epochs={epochs}", f"checkpoint.every_n_steps={steps}",
        "deepspeed.zero_stage=2", "train.precision=fp32",
    ]
    return resolve_recipe(RECIPE, overrides, repo_root=REPO)


# ---- measurements -------------------------------------------------------------------------------

def loader_cost(recipe: Any) -> dict[str, Any]:
    """Rank 0 of a 1-worker job, in this process: one epoch through `StreamLoader(num_workers=0)` with the
    training job's builder; per micro-batch the time in `next()` and in `PackedBatch.to("cpu")`."""
    import torch

    from xsam.data.builder import XSamBuilder
    from xsam.data.loader import StreamLoader
    from xsam.data.render import RenderOptions
    from xsam.model.build import tokenizer_for
    from xsam.model.config import load_model_config

    cfg = load_model_config(recipe.model)
    tokenizer = tokenizer_for(cfg)
    spec = recipe.mixture()
    builder = XSamBuilder(
        tokenizer=tokenizer.name_or_path, chat_format=cfg.llm.chat_format, max_length=cfg.llm.max_length,
        preprocess=cfg.preprocess_config(recipe.data.preprocess), render=RenderOptions(**recipe.data.render),
        seed=spec.seed, micro_batch_size=recipe.train.micro_batch_size,
    )
    builder.prepare()  # the tokenizer, loaded before the clock as the training job does
    cache = Path(work_folder(None, "xsam-bench-train-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a training worker: Ray sets OMP_NUM_THREADS=1 for a 1-CPU worker
    try:
        loader = StreamLoader(spec, world_size=1, rank=0, num_workers=0, micro_batch_size=recipe.train.micro_batch_size,
                              builder=builder, cache_dir=cache)
        batches = iter(loader)
        next(batches).to("cpu")  # first micro-batch: shards opened and verified; not counted
        build, move, tasks = [], [], []
        while True:
            t0 = time.perf_counter()
            packed = next(batches, None)
            t1 = time.perf_counter()
            if packed is None:
                break
            packed.to("cpu")
            build.append(t1 - t0)
            move.append(time.perf_counter() - t1)
            tasks.append(packed.tasks[0] if getattr(packed, "tasks", None) else "?")
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(cache, ignore_errors=True)
    return {"micro_batches": len(build), "next_ms": 1000 * statistics.median(build), "next_max_ms": 1000 * max(build),
            "to_ms": 1000 * statistics.median(move), "to_max_ms": 1000 * max(move), "tasks": sorted(set(tasks))}


def train_once(recipe: Any, *, storage: Path, name: str, world: int, log: Any) -> dict[str, Any]:
    from jobs.train import run_training

    window = Window()
    result = run_training(recipe, storage=storage, name=name, world_size=world, resume=None, tracking=None, log=log)
    return {"run_name": result.run_name, "steps": result.steps, "total_steps": result.total_steps, **window.stop()}


def summarize(run: dict[str, Any], *, world: int, loader_workers: int, warmup: int, per_epoch: int) -> dict[str, Any]:
    kept = [s for s in run["steps"] if s["step"] > warmup]
    if not kept:
        raise RuntimeError(f"run {run['run_name']}: no step after the {warmup} warm-up steps")
    wait, step = sum(s["data_wait_s"] for s in kept), sum(s["step_s"] for s in kept)
    worst = max(kept, key=lambda s: s["data_wait_share"])
    # the first step of each later epoch (from the plan: the records' `epoch` is the loader's, which moves on
    # when the epoch's last micro-batch is handed out, i.e. during the epoch's last step on some layouts)
    epochs = list(range(per_epoch + 1, len(run["steps"]) + 1, per_epoch))
    within = [s for s in kept if s["step"] not in epochs]  # without the steps that start an epoch
    rate = statistics.median(s["samples_per_s"] for s in kept)
    return {
        "world": world, "loader_workers": loader_workers, "run_name": run["run_name"], "kept": len(kept),
        "samples_per_s": rate, "per_worker": rate / world,
        "samples_min": min(s["samples_per_s"] for s in kept), "samples_max": max(s["samples_per_s"] for s in kept),
        "wait_share": wait / step, "wait_s": wait / len(kept), "step_s": step / len(kept),
        "within_share": sum(s["data_wait_s"] for s in within) / sum(s["step_s"] for s in within) if within else None,
        "step_median_s": statistics.median(s["step_s"] for s in kept),
        "worst_share": worst["data_wait_share"], "worst_step": worst["step"], "epoch_changes": epochs,
        "startup_s": run["wall_s"] - sum(s["step_s"] for s in run["steps"]),
        **{k: run[k] for k in ("wall_s", "own_cores", "machine_cores", "others_cores", "load_start", "load_end")},
        "steps": run["steps"],
    }


# ---- the run ----------------------------------------------------------------------------------


def configurations(loader_workers: int) -> list[tuple[int, int]]:
    """(Ray Train workers, loader processes per worker): the scaling pair first, then the loader comparison."""
    runs = [(1, loader_workers), (2, loader_workers)]
    runs += [(1, w) for w in (0, 1) if w != loader_workers]
    return runs


def machine() -> dict[str, str]:
    import deepspeed
    import ray
    import torch

    return machine_facts(ray=ray.__version__, torch=torch.__version__, deepspeed=deepspeed.__version__)


def say(msg: str) -> None:
    """Progress on stderr: a run takes minutes."""
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from jobs.train import plan_training

    started = time.perf_counter()
    ticks_start, load_start = cpu_ticks(), loadavg()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)
    out = Path(args.out)
    data = work_folder(str(out / "train-data"), "xsam-bench-train")
    runs_root = work_folder(str(out / "train-runs"), "xsam-bench-train")
    build_datasets(data)
    setup_s = time.perf_counter() - started
    say(f"example datasets converted in {setup_s:.1f} s into {data}")

    probe = recipe_for(data, steps=args.steps, loader_workers=args.num_workers)
    per_epoch = plan_training(probe, world_size=1).steps_per_epoch
    cost = loader_cost(probe)
    say(f"loader, in this process: {cost['next_ms']:.0f} ms per micro-batch, to('cpu') {cost['to_ms']:.1f} ms")

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=args.verbose)
    ray_s = time.perf_counter() - t
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    try:
        for world, loader_workers in configurations(args.num_workers):
            recipe = recipe_for(data, steps=args.steps, loader_workers=loader_workers, steps_per_epoch=per_epoch)
            name = f"bench-{stamp}-w{world}-l{loader_workers}"
            say(f"training {name}: {world} worker(s), data.num_workers={loader_workers}, {args.steps} steps ...")
            res = train_once(recipe, storage=runs_root, name=name, world=world, log=log)
            row = summarize(res, world=world, loader_workers=loader_workers, warmup=args.warmup, per_epoch=per_epoch)
            rows.append(row)
            say(f"  {row['samples_per_s']:.2f} samples/s, data wait {row['wait_share']:.1%}, run {row['wall_s']:.0f} s")
    finally:
        ray.shutdown()

    def find(world: int, loader_workers: int) -> dict[str, Any]:
        return next(r for r in rows if r["world"] == world and r["loader_workers"] == loader_workers)

    return {
        "args": {"steps": args.steps, "warmup": args.warmup, "num_workers": args.num_workers, "quick": args.quick},
        "machine": machine(),
        "steps_per_epoch": per_epoch,
        "loader_cost": cost,
        "runs": rows,
        "scaling": find(2, args.num_workers)["samples_per_s"] / find(1, args.num_workers)["samples_per_s"],
        "phases_s": {"setup": setup_s, "ray_init": ray_s},
        "total_s": time.perf_counter() - started,
        "load": {"start": load_start, "end": loadavg(), "busy": busy_share(ticks_start, cpu_ticks())},
        "runs_folder": str(runs_root),
    }


# ---- report -----------------------------------------------------------------------------------


def label(row: dict[str, Any]) -> str:
    return f"{row['world']} worker{'s' if row['world'] > 1 else ''}, data.num_workers={row['loader_workers']}"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Left: the mean kept step split into data wait and compute, per configuration. Right: each step's
    data-wait share (warm-up shaded, the 5% target, epoch starts marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows, warmup = result["runs"], result["args"]["warmup"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100, gridspec_kw={"width_ratios": [1, 1.3]})
    names = [label(r).replace(", ", "\n") for r in rows]
    waits = [r["wait_s"] for r in rows]
    compute = [r["step_s"] - r["wait_s"] for r in rows]
    x = range(len(rows))
    left.bar(x, compute, color="tab:blue", label="compute (step - data wait)")
    left.bar(x, waits, bottom=compute, color="tab:red", label="data wait (rank 0)")
    for i, r in enumerate(rows):
        left.text(i, r["step_s"], f"{r['wait_share']:.1%} wait\n{r['samples_per_s']:.2f} samples/s",
                  ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(x), names, fontsize=8)
    left.set_ylabel(f"mean seconds per optimizer step (steps {warmup + 1}-{result['args']['steps']})")
    left.set_ylim(0, max(r["step_s"] for r in rows) * 1.5)
    left.legend(fontsize=8, loc="upper center", ncol=2)
    left.set_title("step time: data wait vs compute", fontsize=10)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    top = 0.0
    for r, color in zip(rows, colors):
        steps = r["steps"]
        shares = [100 * s["data_wait_share"] for s in steps]
        top = max(top, *shares)
        right.plot([s["step"] for s in steps], shares, marker="o", ms=3, color=color, label=label(r))
    for step in sorted({s for r in rows for s in r["epoch_changes"]}):
        right.axvline(step, color="0.4", ls=":", lw=1)
        right.text(step - 0.1, top * 1.1, "new epoch:\nloader restarts", fontsize=7, va="top", ha="right",
                   color="0.3")
    right.axvspan(0.5, warmup + 0.5, color="0.88", label="warm-up (not counted)")
    right.axhline(100 * TARGET_WAIT, color="tab:red", ls="--", lw=1, label="target 5%")
    right.set_yscale("symlog", linthresh=1)
    right.set_ylim(0, top * 1.4)
    right.set_xlim(0.5, max(len(r["steps"]) for r in rows) + 0.5)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("optimizer step")
    right.set_ylabel("data wait / step time (%, rank 0)")
    right.set_title("data-wait share per step", fontsize=10)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    fig.suptitle(f"tiny stage-3 (ZeRO-2, CPU, fp32) on Ray Train: {machine_title(result['machine'])}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def meets(row: dict[str, Any]) -> bool:
    """The data-wait target, on the share as printed (one decimal of a percent): 4.96% shows as 5.0%, not met."""
    return round(100 * row["wait_share"], 1) < 100 * TARGET_WAIT


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def verdict(result: dict[str, Any]) -> str:
    """Whether the data-wait target was met, and why, built from the figures."""
    rows, cost, per_epoch = result["runs"], result["loader_cost"], result["steps_per_epoch"]
    met = [r for r in rows if meets(r)]
    missed = [r for r in rows if not meets(r)]
    def named(group: list[dict[str, Any]]) -> str:
        return " and ".join(f"{label(r).replace(', ', ' with ')} ({r['wait_share']:.1%})" for r in group)

    parts = ([f"met for {named(met)}"] if met else []) + ([f"NOT met for {named(missed)}"] if missed else [])
    # forward + backward + optimizer per micro-batch on a rank: a step is 2 / world micro-batches
    step_ms = 1000 * statistics.median(r["step_median_s"] * r["world"] / 2 for r in rows)
    text = [f"**Data-wait target (< 5% of the step, steps {result['args']['warmup'] + 1}-{result['args']['steps']}): "
            f"{'; '.join(parts)}.**"]
    inline = [r for r in rows if r["loader_workers"] == 0]
    if inline:
        text.append(f"With data.num_workers=0 every micro-batch is built inside `next()`, {cost['next_ms']:.0f} ms "
                    f"(median; max {cost['next_max_ms']:.0f}) against about {step_ms:.0f} ms of forward, backward and "
                    "optimizer per micro-batch, so the wait is the build itself.")
    procs = [r for r in rows if r["loader_workers"] > 0]
    if procs:
        within = ", ".join(f"{_pct(r['within_share'])} ({r['world']} worker{'s' if r['world'] > 1 else ''})"
                           for r in procs)
        text.append(f"With loader processes the next micro-batch is built while the step computes: the wait within "
                    f"an epoch is {within}.")
        spikes = [r for r in procs if r["worst_step"] in r["epoch_changes"]]
        if spikes:
            worst = ", ".join(f"{r['worst_share']:.0%} of step {r['worst_step']} with {r['world']} "
                              f"worker{'s' if r['world'] > 1 else ''}" for r in spikes)
            text.append(f"The rest is the first step of a new epoch ({worst}): `StreamLoader` starts new loader "
                        f"processes every epoch, and these example datasets make an epoch of {per_epoch} steps, so "
                        "that start-up is one kept step in "
                        f"{result['args']['steps'] - result['args']['warmup']}; in an epoch of thousands of steps it "
                        "would not count.")
    others = [r["others_cores"] for r in rows if r["others_cores"] is not None]
    if others:
        spread = f"{min(others):.1f}" + (f"-{max(others):.1f}" if f"{max(others):.1f}" != f"{min(others):.1f}" else "")
        text.append(f"Other processes kept {spread} of the {result['machine']['nproc']} cores busy during the runs, "
                    "which moves every figure here.")
    return " ".join(text)


def markdown(result: dict[str, Any]) -> str:
    a, m, cost, busy = result["args"], result["machine"], result["loader_cost"], result["load"]["busy"]
    rows = result["runs"]
    lines = [
        f"{ONE_RUN}{quick_note(a.get('quick', False))}",
        "",
        f"Run: `.venv/bin/python benchmarks/train.py --steps {a['steps']} --warmup {a['warmup']} "
        f"--num-workers {a['num_workers']} --write-docs` (tiny-stage3 over the llava, refcoco, reasonseg and coco-vgd "
        f"example datasets, {result['steps_per_epoch']} optimizer steps per epoch, global batch 2, micro-batch 1); "
        f"{m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Ray {m['ray']}, torch {m['torch']}, "
        f"DeepSpeed {m['deepspeed']}; whole run {result['total_s']:.0f} s (datasets "
        f"{result['phases_s']['setup']:.0f} s, ray.init {result['phases_s']['ray_init']:.0f} s); load average "
        f"{result['load']['start']} at the start, {result['load']['end']} at the end"
        + (f", CPUs {100 * busy:.0f}% busy during the run." if busy is not None else "."),
        "",
        f"Steps {a['warmup'] + 1}-{a['steps']} of each run (the first {a['warmup']} dropped as warm-up); samples/s is "
        "job-wide (`samples_per_s` of the step records: the global batch over rank 0's step time), the data-wait share "
        "is sum(`data_wait_s`) / sum(`step_s`) over the same steps:",
        "",
        "| Ray Train workers | data.num_workers | samples/s (min-max) | per worker | 2 / 1 workers | data wait share "
        "(target < 5%) | data wait share within epochs | largest step share | mean step s (data wait s) | "
        "run s (start-up s) | cores used by this run | cores used by other processes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next(r for r in rows if r["world"] == 1 and r["loader_workers"] == a["num_workers"])
    for r in rows:
        scaling = "-"
        if r["loader_workers"] == a["num_workers"]:
            scaling = "1" if r["world"] == 1 else f"{r['samples_per_s'] / base['samples_per_s']:.2f}"
        target = "met" if meets(r) else "NOT met"
        lines.append(
            f"| {r['world']} | {r['loader_workers']} | {r['samples_per_s']:.2f} ({r['samples_min']:.2f}-"
            f"{r['samples_max']:.2f}) | {r['per_worker']:.2f} | {scaling} | {r['wait_share']:.1%} ({target}) | "
            f"{_pct(r['within_share'])} | "
            f"{r['worst_share']:.1%} (step {r['worst_step']}) | {r['step_s']:.2f} ({r['wait_s']:.3f}) | "
            f"{r['wall_s']:.0f} ({r['startup_s']:.0f}) | {_cores(r['own_cores'])} | {_cores(r['others_cores'])} |"
        )
    loader_pair = {r["loader_workers"]: r for r in rows if r["world"] == 1}
    lines += [
        "",
        f"Scaling, 2 / 1 workers (data.num_workers={a['num_workers']}, the same run): **{result['scaling']:.2f}x** "
        "samples/s.",
    ]
    if 0 in loader_pair and 1 in loader_pair:
        lines.append(
            "Loader processes per training worker, 1 worker: data.num_workers=0 waits "
            f"{loader_pair[0]['wait_share']:.1%} of each step ({loader_pair[0]['samples_per_s']:.2f} samples/s), "
            "data.num_workers=1 "
            f"{loader_pair[1]['wait_share']:.1%} ({loader_pair[1]['samples_per_s']:.2f} samples/s)."
        )
    lines += [
        f"The loader alone, in the benchmark process (rank 0 of 1 worker, `num_workers=0`, one epoch, "
        f"{cost['micro_batches']} micro-batches of {', '.join(cost['tasks'])} after the first): `next()` "
        f"{cost['next_ms']:.0f} ms per micro-batch (max {cost['next_max_ms']:.0f}); `PackedBatch.to(\"cpu\")`, which "
        f"the training loop runs after `next()` and so counts as compute, {cost['to_ms']:.1f} ms "
        f"(max {cost['to_max_ms']:.1f}).",
        "",
        verdict(result),
        "",
        f"![step time split into data wait and compute]({os.path.relpath(PLOT, DOCS.parent)})",
    ]
    return "\n".join(lines)


def console_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    a = result["args"]
    table = Table(title=f"tiny stage-3 training, steps {a['warmup'] + 1}-{a['steps']} (warm-up dropped)")
    for col in ("workers", "data.num_workers", "samples/s", "per worker", "2/1", "data wait", "within epochs",
                "largest step", "step s", "run s", "others' cores"):
        table.add_column(col, justify="right")
    for r in result["runs"]:
        scaling = "-"
        if r["loader_workers"] == a["num_workers"]:
            scaling = "1" if r["world"] == 1 else f"{result['scaling']:.2f}"
        wait = f"{r['wait_share']:.1%}"
        table.add_row(
            str(r["world"]), str(r["loader_workers"]), f"{r['samples_per_s']:.2f}", f"{r['per_worker']:.2f}", scaling,
            f"[{'green' if meets(r) else 'red'}]{wait}[/]", _pct(r["within_share"]),
            f"{r['worst_share']:.1%} @{r['worst_step']}", f"{r['step_s']:.2f}", f"{r['wall_s']:.0f}",
            _cores(r["others_cores"]),
        )
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(table)
    console.print(verdict(result).replace("**", ""))


def write_docs(text: str) -> None:
    write_block(BEGIN, END, text, missing=f"{SECTION}\n\n## Results\n\n{BEGIN}\n{END}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (12)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out (2)")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="data.num_workers (loader processes per training worker) of the 1 vs 2 worker runs (1);\n"
                             "1 worker is also run with the other of 0 and 1")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"),
                        help="datasets go to OUT/train-data, runs to OUT/train-runs (both emptied first)")
    parser.add_argument("--plot", default=None,
                        help=f"the PNG (default: OUT/train-step-time.png; {shown(PLOT)} with --write-docs)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes, a check that it runs: the flags left at their defaults become "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--write-docs", action="store_true", help=f"update the results in {shown(DOCS)}")
    parser.add_argument("--json", default=None, help="also write the raw results (every step record) to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the training workers' output")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.num_workers < 0 or args.warmup < 0 or args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup; counts must be >= 0")
    if args.write_docs and args.plot and Path(args.plot).resolve() != PLOT:
        parser.error(f"--write-docs links {shown(PLOT)}: leave out --plot")
    args.plot = args.plot or str(PLOT if args.write_docs else Path(args.out) / "train-step-time.png")
    result = run(args)
    png = plot(result, Path(args.plot))
    console_table(result)
    print(f"plot: {png}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.write_docs:
        write_docs(markdown(result))
        print(f"(updated {shown(DOCS)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
