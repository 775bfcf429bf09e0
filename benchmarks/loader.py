"""Training data stream: the loader's items/s as a ratio to the same build + collate in a plain loop.

    .venv/bin/python benchmarks/loader.py [--records N] [--items K] [--repeats R] [--write-docs] [--profile]

What runs (see docs/benchmarks.md, "Benchmarks: training data stream"):

- inputs, built from the real samples in the corpora folder (never invented annotations):
  COCO instances over the real COCO val2017 JPEG 000000439180 (640x360) with its 32 real RLE
  annotations, replicated under image ids 1..N (`tests/builders.py::build_instances(sample="rle",
  split="train2017")`), converted in this process (`tests/builders.py::convert_local`, no Ray);
  one tiny offline tokenizer (`xsam.text.tokenizer.build_tiny_tokenizer`);
- 1. throughput, in this process, per image size (`--sizes`, vision/seg; the paper's 384/1024 is
  the headline, 64/256 is what the tests use), over an epoch of exactly K items of the N-record
  dataset (`epoch_items: K`, so the loader stops by itself and no worker builds a batch nobody
  takes). Per repeat, in this order:
  * `plain`: `XSamBuilder.build` on each of rank 0's K planned items, then `XSamBuilder.collate`
    per micro-batch, in a plain loop (the items are looked up in the plan and the shard index
    before the clock starts: the floor is only decode + preprocess + tokenise + collate);
  * `loader W=2`: `StreamLoader(num_workers=2)` with the same builder over the same K items (the
    same micro-batches: the keys are checked to be equal), from constructing it to the K-th item;
  * `loader W=0`: the same in this process (the loader's own overhead);
  each loader run's ratio is taken against the plain loop of the same repeat; tables show medians
  with min-max. "Steady" rates leave out the first micro-batch of each worker (worker start-up:
  fork, first shard opened, first build); "incl. start-up" rates do not. CPU is this process's
  `time.process_time` plus the joined workers' `RUSAGE_CHILDREN`; "cores used by other processes"
  is the machine's busy CPUs (/proc/stat) minus this run's own, during the same pass;
- 2. peak memory: the loader (2 workers, full builder, the small size) over datasets of N and 10N
  records (same records per shard, same shuffle buffer), the same number of items consumed, each
  in a fresh subprocess: the main process's VmHWM, the largest worker's maxrss (joined children),
  and the peak summed PSS / RSS of the process tree sampled every 50 ms from /proc; plus the
  plan's own memory (tracemalloc) for synthetic manifests of 10^5 and 10^6 items;
- 3. time to first batch: the same `--ttfb-records` records converted with shard sizes giving
  `--ttfb-shards` shards, each run in a fresh subprocess with an empty cache folder (so the
  shards the first batch touches are hashed: the first start of a job on a machine), from
  constructing `StreamLoader` (manifest read, plan) to the first batch, with the default `KeysOnly`
  builder and with the full builder at the headline size, 2 workers; and, at the largest shard
  count, the full builder with its tokenizer loaded in the main process before (not timed), which
  the forked workers then inherit instead of each loading it.

`--profile` instead prints a cProfile of the plain loop at each size and the cost of pickling
a micro-batch for the trip from a worker (`ForkingPickler.dumps`: tensors moved to shared memory).

Only `time.perf_counter`/`time.process_time`/`resource`//proc and the project's own code are used.
Nothing is asserted on timings: the script reports, and says whether the issue's target was met.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (CORPORA, DOCS, ONE_RUN, busy_share, cpu_ticks, emit, load_builders, loadavg, quick_note,
                    shown, work_folder, write_block)
from common import machine as machine_facts


BEGIN, END = "<!-- bench:loader:begin -->", "<!-- bench:loader:end -->"
SECTION = "# Benchmarks: training data stream"

PARTS = ("throughput", "memory", "first-batch")
TARGET_RATIO = 1.5  # loader with 2 workers / plain loop, on 2 cores
SEED = 1234
# --quick: the flags left at their defaults become these (a check that the benchmark runs, in ~1 minute)
QUICK = {"records": 24, "items": "20", "repeats": 1, "rss_items": 8, "ttfb_records": 100, "ttfb_shards": "1,10,100",
         "ttfb_repeats": 1, "plan_items": "100000"}


def parse_size(text: str) -> tuple[int, int]:
    vision, _, seg = text.partition("/")
    return int(vision), int(seg)


def size_label(size: tuple[int, int]) -> str:
    return f"{size[0]}/{size[1]}"


# ---- inputs -----------------------------------------------------------------------------------


def convert(inputs: dict[str, Path], out: Path, shard_samples: int) -> Path:
    from dataprep.convert import ConvertParams

    return load_builders().convert_local(
        "coco-instances", out, inputs, ConvertParams(shard_max_samples=shard_samples)
    )


def build_inputs(root: Path, records: int) -> dict[str, Path]:
    return load_builders().build_instances(CORPORA, root, records, sample="rle", split="train2017")


def mixture(path: Path | str, *, buffer: int, global_batch: int, epoch_items: int | None = None) -> Any:
    """One source, mixed batching. With EPOCH_ITEMS the epoch holds exactly that many items (the
    loader then stops by itself: no worker builds a batch nobody takes, so CPU times are exact)."""
    from xsam.data.mixture import parse_mixture

    sizing = {"weight": 1.0} if epoch_items else {"repetitions": 1}
    return parse_mixture(
        {
            "seed": SEED,
            "shuffle_buffer": buffer,
            **({"epoch_items": epoch_items} if epoch_items else {}),
            "batching": {"mode": "mixed", "global_batch_size": global_batch},
            "sources": [{"name": "coco", "path": str(path), **sizing}],
        }
    )


def make_builder(tokenizer: Path | str, size: tuple[int, int], micro: int) -> Any:
    from xsam.data.builder import XSamBuilder
    from xsam.data.transforms import PreprocessConfig

    return XSamBuilder(
        tokenizer=str(tokenizer),
        preprocess=PreprocessConfig(vision_size=size[0], seg_size=size[1]),
        seed=SEED,
        micro_batch_size=micro,
    )


def planned_items(spec: Any, sources: list, count: int, cache: Any) -> list:
    """Rank 0's first COUNT items as the loader plans them (world size 1), as `RawItem`s: the same
    lookups as `_RankEpoch.__getitem__`, done before any clock starts."""
    from xsam.data.loader import RawItem
    from xsam.data.plan import PlanCache, RankLayout
    from xsam.data.shards import ShardReader

    layout = RankLayout(spec.batching.global_batch_size, 1, 0)
    plans = PlanCache(spec, sources)
    plan = plans.epoch(0)
    readers = [ShardReader(s, cache) for s in sources]
    out = []
    for j in range(count):
        b, slot = layout.sample(j)
        src, pos = plan.batch(b)
        d, p = int(src[slot]), int(pos[slot])
        ref = plans.orders[d].locate(p)
        key, index = readers[d].locate(ref.shard, ref.item)
        out.append(RawItem(sources[d], ref, key, index, readers[d]))
    return out


# ---- measurements -------------------------------------------------------------------------------


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def tensor_bytes(batch: Any) -> dict[str, int]:
    """Bytes of every array field of a `PackedBatch` (tensors, numpy arrays, `MaskStack`s; lists
    summed): what a worker ships to the main process (tensors through shared memory, numpy arrays
    by value through the pipe)."""
    import dataclasses

    import numpy as np
    import torch

    def size(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, np.ndarray):
            return x.nbytes
        if dataclasses.is_dataclass(x) and not isinstance(x, type) and hasattr(x, "bits"):
            return sum(size(getattr(x, f.name)) for f in dataclasses.fields(x))
        return 0

    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        out[f.name] = sum(size(v) for v in (value if isinstance(value, list) else [value]))
    return out


def plain_pass(builder: Any, raws: list, micro: int) -> dict[str, Any]:
    """build + collate over RAWS in this process, micro-batch by micro-batch."""
    keys: list[str] = []
    ticks0, c0, t0 = cpu_ticks(), time.process_time(), time.perf_counter()
    for i in range(0, len(raws), micro):
        batch = builder.collate([builder.build(raw) for raw in raws[i : i + micro]])
        keys.extend(batch.keys)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall": wall, "cpu": cpu, "keys": keys, "machine_cores": busy_cores(ticks0, cpu_ticks()),
        "bytes_per_item": sum(tensor_bytes(batch).values()) / len(batch),
    }


def loader_pass(
    spec: Any, sources: list, builder: Any, workers: int, micro: int, count: int, cache_dir: Path
) -> dict[str, Any]:
    """StreamLoader from construction to the COUNT-th item; workers are shut down (untimed) after.
    CPU is this process's plus the (joined) workers'."""
    import multiprocessing

    from xsam.data.loader import StreamLoader

    keys: list[str] = []
    arrivals: list[float] = []
    ticks0, ch0, c0, t0 = cpu_ticks(), children_cpu(), time.process_time(), time.perf_counter()
    loader = StreamLoader(
        spec, world_size=1, rank=0, num_workers=workers, micro_batch_size=micro, builder=builder,
        cache_dir=cache_dir, sources=sources,
    )
    it = iter(loader)
    for batch in it:
        arrivals.append(time.perf_counter())
        keys.extend(batch.keys)
        if len(keys) >= count:
            break
    cpu_main = time.process_time() - c0
    machine_cores = busy_cores(ticks0, cpu_ticks())
    del batch
    it.close()  # the DataLoader iterator goes with the generator's frame: its workers are joined
    for _ in range(100):
        if not multiprocessing.active_children():
            break
        time.sleep(0.05)
    w = max(workers, 1)  # the first micro-batch of each worker carries its start-up
    return {
        "workers": workers,
        "total": arrivals[-1] - t0,
        "first": arrivals[0] - t0,
        "steady": arrivals[-1] - arrivals[w - 1],
        "steady_items": len(keys) - w * micro,
        "cpu": cpu_main + (children_cpu() - ch0),
        "cpu_main": cpu_main,
        "machine_cores": machine_cores,
        "keys": keys,
    }


@dataclass
class SizeRun:
    size: tuple[int, int]
    items: int
    plain: list[dict] = field(default_factory=list)
    loaders: dict[int, list[dict]] = field(default_factory=dict)  # workers -> runs (one per repeat)
    bytes_per_item: float = 0.0  # tensor bytes of a micro-batch / its items (what a worker ships)


def throughput(args: argparse.Namespace, dataset: Path, tokenizer: Path, scratch: Path, log: Any) -> list[SizeRun]:
    from xsam.data.plan import open_sources
    from xsam.data.shards import ShardCache

    micro = args.micro
    cache_dir = scratch / "cache"
    cache = ShardCache(cache_dir)
    runs = []
    for size, count in zip(args.sizes, args.size_items, strict=True):
        spec = mixture(dataset, buffer=args.shuffle_buffer, global_batch=micro, epoch_items=count)
        sources = open_sources(spec)
        builder = make_builder(tokenizer, size, micro)
        raws = planned_items(spec, sources, count, cache)
        # warm-up (untimed): tokenizer loaded here, shards verified (marks in the cache folder),
        # worker start-up paths exercised; the loader must plan exactly the plain loop's items
        warm = plain_pass(builder, raws[: 2 * micro], micro)
        check = loader_pass(spec, sources, builder, 2, micro, 4 * micro, cache_dir)
        if check["keys"] != [r.key for r in raws[: 4 * micro]] or warm["keys"] != check["keys"][: 2 * micro]:
            raise RuntimeError("the loader and the plain loop do not see the same items")
        run = SizeRun(size, count)
        for r in range(args.repeats):
            plain = plain_pass(builder, raws, micro)
            run.plain.append({k: v for k, v in plain.items() if k != "keys"})
            run.bytes_per_item = plain["bytes_per_item"]
            msg = f"  repeat {r + 1}/{args.repeats} {size_label(size)}: plain {count / plain['wall']:.1f}/s"
            for workers in args.workers:
                res = loader_pass(spec, sources, builder, workers, micro, count, cache_dir)
                if res["keys"] != plain["keys"]:
                    raise RuntimeError(f"loader W={workers} consumed other items than the plain loop")
                run.loaders.setdefault(workers, []).append({k: v for k, v in res.items() if k != "keys"})
                msg += f", W={workers} {res['steady_items'] / res['steady']:.1f}/s steady"
            log(msg)
        runs.append(run)
    return runs


def _others(pairs: list[tuple[float | None, float]]) -> float | None:
    """Median CPUs kept busy by other processes (machine busy minus this run's own CPU)."""
    values = [max(0.0, machine - own) for machine, own in pairs if machine is not None]
    return statistics.median(values) if values else None


def summarize_size(run: SizeRun) -> list[dict[str, Any]]:
    plain_rates = [run.items / p["wall"] for p in run.plain]
    rows = [
        {
            "size": size_label(run.size),
            "config": "plain loop",
            "items": run.items,
            "rate": statistics.median(plain_rates),
            "rate_total": statistics.median(plain_rates),
            "cpu_ms": statistics.median(1000 * p["cpu"] / run.items for p in run.plain),
            "cores": statistics.median(p["cpu"] / p["wall"] for p in run.plain),
            "others": _others([(p["machine_cores"], p["cpu"] / p["wall"]) for p in run.plain]),
            "mb_per_item": run.bytes_per_item / 2**20,
        }
    ]
    plain_cpu = rows[0]["cpu_ms"]
    for workers, results in run.loaders.items():
        steady = [r["steady_items"] / r["steady"] for r in results]
        total = [run.items / r["total"] for r in results]
        ratios = [s / p for s, p in zip(steady, plain_rates)]
        ratios_total = [s / p for s, p in zip(total, plain_rates)]
        rows.append(
            {
                "size": size_label(run.size),
                "config": f"loader, {workers} workers",
                "workers": workers,
                "items": run.items,
                "rate": statistics.median(steady),
                "rate_total": statistics.median(total),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratio_total": statistics.median(ratios_total),
                "first_s": statistics.median(r["first"] for r in results),
                "cpu_ms": statistics.median(1000 * r["cpu"] / run.items for r in results),
                "cpu_main_ms": statistics.median(1000 * r["cpu_main"] / run.items for r in results),
                "cores": statistics.median(r["cpu"] / r["total"] for r in results),
                "others": _others([(r["machine_cores"], r["cpu"] / r["total"]) for r in results]),
                "runs": results,
            }
        )
        rows[-1]["efficiency"] = plain_cpu / rows[-1]["cpu_ms"]
    rows[0]["runs"] = run.plain
    return rows


# ---- subprocess measurements (peak memory, time to first batch) --------------------------------


def _tree_pids(root: int) -> list[int]:
    """ROOT and its descendants, from /proc (no psutil)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            parents[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        out += frontier
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB (PSS from smaps_rollup; RSS when it is not readable)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        return 0, 0
    return rss, pss or rss


class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS of this process and its children, sampled every `period` s."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period, self.peak_rss, self.peak_pss, self.procs = period, 0, 0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def sample(self) -> None:
        pids = _tree_pids(os.getpid())
        mem = [_memory_kb(p) for p in pids]
        self.peak_rss = max(self.peak_rss, sum(m[0] for m in mem))
        self.peak_pss = max(self.peak_pss, sum(m[1] for m in mem))
        self.procs = max(self.procs, len(pids))

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def _status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in kB. (Not getrusage's ru_maxrss for the process itself: Linux
    carries it over exec, so a subprocess would report the RSS of the parent it was forked from.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh process (called with --child JSON)."""
    import gc

    from xsam.data.loader import StreamLoader

    micro, workers = job["micro"], job["workers"]
    builder = make_builder(job["tokenizer"], tuple(job["size"]), micro) if job["builder"] != "keys" else None
    preload_s = None
    if job["builder"] == "preloaded":  # the tokenizer loaded in this process first: forked workers inherit it
        t = time.perf_counter()
        assert builder is not None and builder.pad_id is not None
        preload_s = time.perf_counter() - t
    spec = mixture(job["dataset"], buffer=job["buffer"], global_batch=micro)
    gc.collect()
    base_kb = _status_kb("VmRSS")
    sampler = TreeSampler() if job["kind"] == "rss" else None
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    loader = StreamLoader(
        spec, world_size=1, rank=0, num_workers=workers, micro_batch_size=micro, builder=builder,
        cache_dir=job["cache_dir"],
    )
    t1 = time.perf_counter()
    it = iter(loader)
    seen = 0
    first = None
    for batch in it:
        if first is None:
            first = time.perf_counter() - t0
        seen += len(batch)
        if seen >= job["items"]:
            break
    last = time.perf_counter() - t0
    del batch
    it.close()
    out = {
        "construct_s": t1 - t0, "first_s": first, "last_s": last, "items": seen,
        "shards": len(loader.sources[0].shards), "preload_s": preload_s,
    }
    if sampler:
        sampler.stop()
        out.update(
            base_kb=base_kb,
            self_maxrss_kb=_status_kb("VmHWM"),
            worker_maxrss_kb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            tree_rss_kb=sampler.peak_rss,
            tree_pss_kb=sampler.peak_pss,
            procs=sampler.procs,
        )
    return out


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {job['kind']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_memory(items_list: list[int], per_shard: int) -> list[dict[str, Any]]:
    """tracemalloc peak of computing epoch 0's plan (+ one source order lookup) for a synthetic
    manifest of N items: what every process (main and each worker) holds per epoch planned."""
    import tracemalloc

    from xsam.data.mixture import parse_mixture
    from xsam.data.plan import PlanCache, ShardInfo, SourceInfo

    rows = []
    for n in items_list:
        spec = parse_mixture(
            {"seed": SEED, "batching": {"mode": "mixed", "global_batch_size": 64},
             "sources": [{"name": "synthetic", "path": "/nonexistent", "repetitions": 1}]}
        )
        shards = tuple(
            ShardInfo(name=f"s{k}", sha256="0" * 64, bytes=1, samples=c, items=c, total_items=c)
            for k, c in enumerate([per_shard] * (n // per_shard) + ([n % per_shard] if n % per_shard else []))
        )
        source = SourceInfo(spec=spec.sources[0], version="v", meta={}, shards=shards)
        tracemalloc.start()
        t0 = time.perf_counter()
        plans = PlanCache(spec, [source])
        plan = plans.epoch(0)
        plans.orders[0].locate(int(plan.batch(0)[1][0]))
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        current = sum(s.size for s in tracemalloc.take_snapshot().statistics("filename"))
        tracemalloc.stop()
        rows.append({"items": n, "shards": len(shards), "peak_mb": peak / 2**20, "held_mb": current / 2**20,
                     "seconds": seconds})
        del plans, plan
    return rows


# ---- the run ----------------------------------------------------------------------------------


def busy_cores(before: list[int] | None, after: list[int] | None) -> float | None:
    """CPUs the whole machine kept busy between two `cpu_ticks` (this benchmark and anything else)."""
    share = busy_share(before, after)
    return None if share is None else share * (os.cpu_count() or 1)


def machine() -> dict[str, str]:
    import numpy
    import PIL
    import torch

    return machine_facts(
        torch=torch.__version__, torch_threads=str(torch.get_num_threads()), pillow=PIL.__version__,
        numpy=numpy.__version__,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = work_folder(args.out, "xsam-bench-loader")
    try:
        return _run(args, root)
    finally:
        shutil.rmtree(root if args.out is None else root / "scratch", ignore_errors=True)


def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from xsam.text.tokenizer import build_tiny_tokenizer

    started = time.perf_counter()
    load_start, ticks_start = loadavg(), cpu_ticks()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)
    scratch = root / "scratch"
    tokenizer = root / "tokenizer"
    build_tiny_tokenizer(tokenizer)

    # inputs: N and 10N records (throughput on N), and the time-to-first-batch records
    small_n, large_n = args.rss_records
    # (records, records per shard) -> dataset folder; one input folder per record count. With the
    # defaults the 10N dataset of the memory runs is also the middle one of the first-batch runs.
    wanted: list[tuple[int, int]] = [(small_n, args.shard_samples)]
    if "memory" in args.parts:
        wanted.append((large_n, args.shard_samples))
    if "first-batch" in args.parts:
        wanted += [(args.ttfb_records, -(-args.ttfb_records // shards)) for shards in args.ttfb_shards]
    folders: dict[tuple[int, int], Path] = {}
    for n in sorted({n for n, _ in wanted}):
        inputs = build_inputs(root / f"inputs-{n}", n)
        for per in sorted({per for m, per in wanted if m == n}):
            folders[(n, per)] = convert(inputs, root / f"data-{n}-per{per}", per)
        shutil.rmtree(root / f"inputs-{n}")
    datasets = {
        f"rss-{n}": folders[(n, args.shard_samples)] for n in (small_n, large_n) if (n, args.shard_samples) in folders
    }
    for shards in args.ttfb_shards if "first-batch" in args.parts else ():
        datasets[f"ttfb-{shards}"] = folders[(args.ttfb_records, -(-args.ttfb_records // shards))]
    setup_s = time.perf_counter() - started
    log(f"inputs converted in {setup_s:.1f} s")

    # 1. throughput, in this process
    t = time.perf_counter()
    sizes = throughput(args, datasets[f"rss-{small_n}"], tokenizer, scratch, log) if "throughput" in args.parts else []
    throughput_s = time.perf_counter() - t

    # 2. peak memory at N and 10N, fresh subprocesses (alternated, --rss-repeats times)
    t = time.perf_counter()
    rss: dict[int, list[dict]] = {small_n: [], large_n: []} if "memory" in args.parts else {}
    for r in range(args.rss_repeats if rss else 0):
        for n in (small_n, large_n):
            res = run_child(
                {"kind": "rss", "dataset": str(datasets[f"rss-{n}"]), "tokenizer": str(tokenizer),
                 "size": list(args.sizes[-1]), "builder": "full", "workers": 2, "micro": args.micro,
                 "buffer": args.shuffle_buffer, "items": args.rss_items,
                 "cache_dir": str(scratch / f"rss-cache-{n}-{r}")}
            )
            rss[n].append(res)
            log(f"  rss repeat {r + 1} N={n}: main {res['self_maxrss_kb'] / 1024:.0f} MB, worker "
                f"{res['worker_maxrss_kb'] / 1024:.0f} MB, tree PSS {res['tree_pss_kb'] / 1024:.0f} MB")
    plans = plan_memory(args.plan_items, 1000) if rss else []
    rss_s = time.perf_counter() - t

    # 3. time to first batch, fresh subprocess and empty cache each, alternated
    t = time.perf_counter()
    ttfb: dict[tuple[int, str], list[dict]] = {}
    counter = 0
    for r in range(args.ttfb_repeats if "first-batch" in args.parts else 0):
        for builder, counts in (("keys", args.ttfb_shards), ("full", args.ttfb_shards),
                                ("preloaded", args.ttfb_shards[-1:])):
            for shards in counts:
                counter += 1
                res = run_child(
                    {"kind": "ttfb", "dataset": str(datasets[f"ttfb-{shards}"]), "tokenizer": str(tokenizer),
                     "size": list(args.sizes[0]), "builder": builder, "workers": 2, "micro": args.micro,
                     "buffer": args.shuffle_buffer, "items": 1, "cache_dir": str(scratch / f"ttfb-cache-{counter}")}
                )
                ttfb.setdefault((shards, builder), []).append(res)
                log(f"  ttfb repeat {r + 1} {builder} {res['shards']} shards: {res['first_s']:.2f} s "
                    f"(construct {res['construct_s']:.3f} s)")
    ttfb_s = time.perf_counter() - t

    return {
        "args": {
            "records": small_n,
            "items": args.size_items,
            "sizes": [size_label(s) for s in args.sizes],
            "repeats": args.repeats,
            "micro": args.micro,
            "workers": args.workers,
            "shard_samples": args.shard_samples,
            "shuffle_buffer": args.shuffle_buffer,
            "rss_records": args.rss_records,
            "rss_items": args.rss_items,
            "rss_repeats": args.rss_repeats,
            "ttfb_records": args.ttfb_records,
            "ttfb_shards": args.ttfb_shards,
            "ttfb_repeats": args.ttfb_repeats,
            "parts": args.parts,
            "quick": args.quick,
        },
        "machine": machine(),
        "throughput": [row for run in sizes for row in summarize_size(run)],
        "rss": {
            str(n): {
                "records": n,
                "shards": runs[0]["shards"],
                "items": runs[0]["items"],
                **{k: statistics.median(r[k] for r in runs) / 1024 for k in
                   ("base_kb", "self_maxrss_kb", "worker_maxrss_kb", "tree_rss_kb", "tree_pss_kb")},
                "procs": max(r["procs"] for r in runs),
                "runs": runs,
            }
            for n, runs in rss.items()
        },
        "plan_memory": plans,
        "ttfb": [
            {
                "shards": runs[0]["shards"],
                "records": args.ttfb_records,
                "builder": builder,
                "first_s": statistics.median(r["first_s"] for r in runs),
                "first_min": min(r["first_s"] for r in runs),
                "first_max": max(r["first_s"] for r in runs),
                "construct_s": statistics.median(r["construct_s"] for r in runs),
                "preload_s": statistics.median(r["preload_s"] for r in runs) if runs[0]["preload_s"] else None,
                "runs": runs,
            }
            for (shards, builder), runs in ttfb.items()
        ],
        "phases_s": {"setup": setup_s, "throughput": throughput_s, "memory": rss_s, "first_batch": ttfb_s},
        "total_s": time.perf_counter() - started,
        "load": {"start": load_start, "end": loadavg(), "busy": busy_share(ticks_start, cpu_ticks())},
    }


# ---- report -----------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    a, m, busy = result["args"], result["machine"], result["load"]["busy"]
    ph = result["phases_s"]
    lines = [
        f"{ONE_RUN}{quick_note(a.get('quick', False))}",
        "",
        f"Run: `--records {a['records']} --items {','.join(map(str, a['items']))} --sizes {','.join(a['sizes'])} "
        f"--repeats {a['repeats']} --micro {a['micro']}` (shards of {a['shard_samples']} records, shuffle buffer "
        f"{a['shuffle_buffer']}); {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} intra-op threads), Pillow {m['pillow']}, numpy {m['numpy']}; whole run "
        f"{result['total_s']:.0f} s (inputs {ph['setup']:.0f} s, throughput {ph['throughput']:.0f} s, memory "
        f"{ph['memory']:.0f} s, first batch {ph['first_batch']:.0f} s); load average {result['load']['start']} at "
        f"the start, {result['load']['end']} at the end"
        + (f", CPUs {100 * busy:.0f}% busy during the run." if busy is not None else "."),
    ]
    lines += [
        "",
        "Throughput (items/s; the plain loop is `build` + `collate` in one process over the same items and "
        "micro-batches; ratios against the plain loop of the same repeat):",
        "",
        "| vision/seg | configuration | items | items/s steady | loader / plain (min-max) | target | "
        "items/s incl. start-up | ratio incl. start-up | first batch s | CPU ms/item (main process + workers) | "
        "CPU efficiency (plain CPU / this CPU) | cores used | cores used by other processes |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ] if result["throughput"] else []
    for row in result["throughput"]:
        if "ratio" in row:
            target = ("met" if row["ratio"] >= TARGET_RATIO else "NOT met") if row["workers"] == 2 else "-"
            ratio = f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
            extra = f"{row['rate_total']:.1f} | {row['ratio_total']:.2f} | {row['first_s']:.2f}"
        else:
            target, ratio, extra = "-", "1", f"{row['rate_total']:.1f} | - | -"
        others = "?" if row["others"] is None else f"{row['others']:.2f}"
        cpu = f"{row['cpu_ms']:.0f}"
        if row.get("workers"):
            cpu += f" ({row['cpu_main_ms']:.0f} + {row['cpu_ms'] - row['cpu_main_ms']:.0f})"
        lines.append(
            f"| {row['size']} | {row['config']} | {row['items']} | {row['rate']:.1f} | {ratio} | {target} | {extra} "
            f"| {cpu} | {row.get('efficiency', 1.0):.2f} | {row['cores']:.2f} | {others} |"
        )
    shipped = [f"{row['size']}: {row['mb_per_item']:.1f} MB" for row in result["throughput"] if "mb_per_item" in row]
    if shipped:
        lines += [
            "",
            "Array bytes per item of a collated micro-batch (what a worker hands to the main process: tensors through "
            f"shared memory, numpy arrays through the pipe): {', '.join(shipped)}.",
        ]
    rss = list(result["rss"].values())
    if rss:
        lines += memory_lines(result, rss)
    if result["ttfb"]:
        lines += ttfb_lines(result)
    return "\n".join(lines)


def memory_lines(result: dict[str, Any], rss: list[dict[str, Any]]) -> list[str]:
    a = result["args"]
    lines = [
        "",
        f"Peak memory, loader with 2 workers and the full builder at {a['sizes'][-1]}, {rss[0]['items']} items "
        f"consumed, shuffle buffer {a['shuffle_buffer']}, fresh subprocess each (median of {a['rss_repeats']}; MB):",
        "",
        "| records | shards | main process RSS before the loader | main process peak RSS (VmHWM) | largest worker "
        "peak RSS (maxrss) | peak PSS of main + workers (sampled) | peak RSS sum of main + workers (sampled) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rss:
        lines.append(
            f"| {r['records']} | {r['shards']} | {r['base_kb']:.0f} | {r['self_maxrss_kb']:.0f} | "
            f"{r['worker_maxrss_kb']:.0f} | {r['tree_pss_kb']:.0f} | {r['tree_rss_kb']:.0f} |"
        )
    small, large = rss[0], rss[-1]
    lines += [
        "",
        f"10x records: main process peak {large['self_maxrss_kb'] - small['self_maxrss_kb']:+.0f} MB, largest worker "
        f"{large['worker_maxrss_kb'] - small['worker_maxrss_kb']:+.0f} MB, tree PSS "
        f"{large['tree_pss_kb'] - small['tree_pss_kb']:+.0f} MB.",
        "",
        "The plan's own memory per process (`PlanCache.epoch(0)` + one lookup, synthetic manifest of 1000-item "
        "shards, mixed batching, tracemalloc):",
        "",
        "| planned items | shards | peak MB | held MB | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in result["plan_memory"]:
        lines.append(
            f"| {p['items']:,} | {p['shards']:,} | {p['peak_mb']:.1f} | {p['held_mb']:.1f} | {p['seconds']:.2f} |"
        )
    return lines


def ttfb_lines(result: dict[str, Any]) -> list[str]:
    a = result["args"]
    lines = [
        "",
        f"Time to first batch, {a['ttfb_records']} records, 2 workers, fresh subprocess and empty cache folder each "
        f"(median of {a['ttfb_repeats']}, min-max; s):",
        "",
        "| shards | records per shard | builder | constructing StreamLoader | to the first batch (min-max) |",
        "|---:|---:|---|---:|---:|",
    ]
    order = {"keys": 0, "full": 1, "preloaded": 2}
    for row in sorted(result["ttfb"], key=lambda r: (order[r["builder"]], r["shards"])):
        if row["builder"] == "keys":
            builder = "`KeysOnly` (default)"
        elif row["builder"] == "full":
            builder = f"`XSamBuilder` {a['sizes'][0]}"
        else:
            builder = (f"`XSamBuilder` {a['sizes'][0]}, tokenizer loaded in the main process first "
                       f"({row['preload_s']:.1f} s, not counted)")
        lines.append(
            f"| {row['shards']} | {-(-row['records'] // row['shards'])} | {builder} | {row['construct_s']:.3f} | "
            f"{row['first_s']:.2f} ({row['first_min']:.2f}-{row['first_max']:.2f}) |"
        )
    return lines


def write_docs(table: str) -> None:
    write_block(BEGIN, END, table, missing=f"{SECTION}\n\n## Results\n\n{BEGIN}\n{END}\n")


def profile(args: argparse.Namespace) -> None:
    """cProfile of the plain loop at each size, and the cost of sending a micro-batch from a worker."""
    from multiprocessing.reduction import ForkingPickler

    from xsam.data.plan import open_sources
    from xsam.data.shards import ShardCache
    from xsam.text.tokenizer import build_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="xsam-bench-loader-profile-"))
    try:
        tokenizer = root / "tokenizer"
        build_tiny_tokenizer(tokenizer)
        n = max(args.size_items)
        dataset = convert(build_inputs(root / "inputs", n), root / "data", args.shard_samples)
        spec = mixture(dataset, buffer=args.shuffle_buffer, global_batch=args.micro)
        sources = open_sources(spec)
        cache = ShardCache(root / "cache")
        for size, count in zip(args.sizes, args.size_items, strict=True):
            builder = make_builder(tokenizer, size, args.micro)
            raws = planned_items(spec, sources, count, cache)
            plain_pass(builder, raws[: 2 * args.micro], args.micro)  # warm-up
            profiler = cProfile.Profile()
            t0 = time.perf_counter()
            profiler.runcall(plain_pass, builder, raws, args.micro)
            seconds = time.perf_counter() - t0
            print(f"\n## plain loop, {size_label(size)}: {count} items, {count / seconds:.1f} items/s "
                  "under the profiler\n")
            stream = io.StringIO()
            stats = pstats.Stats(profiler, stream=stream).strip_dirs()
            stats.sort_stats("cumulative").print_stats(args.profile_top)
            stats.sort_stats("tottime").print_stats(args.profile_top)
            print(stream.getvalue())
            # what a worker does beyond the plain loop: pickle the micro-batch for the queue (torch moves
            # every tensor's storage into shared memory, a copy), on fresh batches each time
            dumps, nbytes = [], 0
            for i in range(0, min(count, 8 * args.micro), args.micro):
                batch = builder.collate([builder.build(raw) for raw in raws[i : i + args.micro]])
                t0 = time.perf_counter()
                data = ForkingPickler.dumps(batch)
                dumps.append(time.perf_counter() - t0)
                sizes = tensor_bytes(batch)
                nbytes = sum(sizes.values())
                del data, batch
            ms = 1000 * statistics.median(dumps)
            big = sorted(((k, v) for k, v in sizes.items() if v >= 2**16), key=lambda kv: -kv[1])
            parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in big)
            print(f"ForkingPickler.dumps of one micro-batch of {args.micro} ({nbytes / 2**20:.0f} MB of tensors: "
                  f"{parts} MB): median {ms:.1f} ms = {ms / args.micro:.1f} ms per item\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100, help="records of the throughput dataset = N (100)")
    parser.add_argument("--sizes", default="384/1024,64/256",
                        help="vision/seg sizes, headline first (384/1024 = the paper's, 64/256 = the tests')")
    parser.add_argument("--items", default="48,64", help="items consumed per pass, one per size (48,64)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated plain / loader repeats (3)")
    parser.add_argument("--workers", default="2,0", help="loader worker counts compared with the plain loop (2,0)")
    parser.add_argument("--micro", type=int, default=2, help="micro-batch size (2)")
    parser.add_argument("--shard-samples", type=int, default=10, help="records per shard, N and 10N datasets (10)")
    parser.add_argument("--shuffle-buffer", type=int, default=64, help="mixture shuffle_buffer (64)")
    parser.add_argument("--rss-items", type=int, default=96, help="items consumed in each memory run (96)")
    parser.add_argument("--rss-repeats", type=int, default=1, help="memory runs per dataset size (1)")
    parser.add_argument("--plan-items", default="100000,1000000", help="synthetic manifest sizes for the plan memory")
    parser.add_argument("--ttfb-records", type=int, default=1000, help="records of the first-batch datasets (1000)")
    parser.add_argument("--ttfb-shards", default="10,100,1000", help="shard counts of the first-batch datasets")
    parser.add_argument("--ttfb-repeats", type=int, default=2, help="first-batch runs per configuration (2)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which measurements ({','.join(PARTS)})")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes, a check that it runs: the flags left at their defaults become "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--write-docs", action="store_true", help=f"update the results in {shown(DOCS)}")
    parser.add_argument("--json", default=None, help="also write the raw results (every timing) to this file")
    parser.add_argument("--profile", action="store_true", help="instead: cProfile the plain loop at each size")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed per profile (25)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="print each measurement to stderr")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        args.size_items = _int_list(args.items)
        args.workers = _int_list(args.workers)
        args.plan_items = _int_list(args.plan_items)
        args.ttfb_shards = _int_list(args.ttfb_shards)
    except ValueError as exc:
        parser.error(f"expected comma-separated integers (sizes as V/S): {exc}")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        parser.error(f"--parts: a comma-separated subset of {','.join(PARTS)}")
    if args.write_docs and set(args.parts) != set(PARTS):
        parser.error("--write-docs needs every part (leave out --parts)")
    if len(args.size_items) == 1:
        args.size_items *= len(args.sizes)
    if len(args.size_items) != len(args.sizes):
        parser.error("--items: one count per --sizes entry (or one for all)")
    args.rss_records = [args.records, 10 * args.records]
    counts = [args.records, args.repeats, args.micro, args.shard_samples, args.shuffle_buffer, args.rss_items,
              args.rss_repeats, args.ttfb_records, args.ttfb_repeats, *args.size_items, *args.ttfb_shards,
              *args.plan_items, *(v for s in args.sizes for v in s)]
    if min(counts) < 1 or any(w < 0 for w in args.workers):
        parser.error("counts and sizes must be >= 1 (workers >= 0)")
    rss_items = args.rss_items if "memory" in args.parts else 0
    if not args.profile and (max(args.size_items) > args.records or rss_items > args.records):
        parser.error("--items and --rss-items must not exceed --records (one epoch of the dataset)")
    if any(k % args.micro for k in [*args.size_items, args.rss_items]) or args.rss_items < 4 * args.micro:
        parser.error("--items and --rss-items must be multiples of --micro; --rss-items at least 4 micro-batches")
    if min(args.size_items) < 10 * args.micro:
        # "steady" leaves out each worker's first micro-batch; with few batches it is mostly noise
        parser.error("--items: at least 10 micro-batches per pass")
    if max(args.ttfb_shards) > args.ttfb_records:
        parser.error("--ttfb-shards: at most one shard per record")
    if args.profile:
        profile(args)
        return 0
    result = run(args)
    emit(markdown(result), result, args.json, write_docs if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
