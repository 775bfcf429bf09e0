"""Evaluation throughput: items/s of `xsam eval` per benchmark kind, as a ratio to the same per-unit
prediction called in a plain loop, with 1 and 2 actors, measured in one run.

    .venv/bin/python benchmarks/eval.py [--refseg-images N] [--panoptic-records N] [--repeats R] [--write-docs]

What runs, all in one process and one run (see docs/benchmarks.md, "Benchmarks: evaluation"):

- inputs, built from the real samples in the corpora folder (never invented annotations):
  * `refseg` (benchmark `refcoco-val` of configs/benchmarks.yaml): the RefCOCO example of
    `dataprep/examples/refer.py` (the real COCO image 39769 with its real polygons, and its hand-written
    val expressions: 2 refs, 4 sentences) replicated under image ids 1..N: N records, 4N items;
  * `panoptic` (benchmark `coco-panoptic-val`: PQ, mIoU, AP, three score views): the real COCO panoptic
    sample replicated under image ids 1..N (`tests/builders.py::build_panoptic`);
  both converted in this process (`tests/builders.py::convert_local`, no Ray); the model is the tiny
  stage-3 config (`configs/model/tiny.yaml`) randomly initialised (seed 0) with the offline tiny tokenizer
  and saved as an inference folder, as `tests/jobs/test_evaluate.py::tiny_model` does;
- `plain loop` (the floor): `jobs.evaluate.PredictActor` (what every actor runs: read the record from its
  shard, the evaluation items, `forward_item`, the task's post-processing) constructed in this process and
  called on each unit of the benchmark in turn, one torch thread as in an actor, no Ray; per unit the
  time is split into reading the record, building the evaluation items, preprocessing (render, tokenise,
  decode and resize the image, collate), the model's forward and the rest (post-processing: masks back to
  the image size, RLE / PNG encoding, JSON);
- `job, A actors`: `jobs.evaluate.run_evaluation` on the same benchmark with `num_actors=A` (1 and 2) on a
  Ray started once (`num_cpus=2`, loopback) and warmed up by a one-record evaluation of each kind before
  anything is timed. Its phases are timed by wrapping the module's functions (behaviour unchanged):
  ground truth, predicting (`_collect`: the actors start, load the model and predict every unit), writing
  the predictions, scoring (`xsam.eval.score.score`, once per view) and the per-class / sample-grid
  pictures. The actors stamp their own start-up and every unit (a Ray worker set-up hook wraps
  `PredictActor` in each worker: `stamp_actor_units`): "steady" items/s is the sum over the actors of
  the units each predicted over the span from its first unit's start to its last unit's end (start-up
  left out, Ray Data's hand-over between batches counted); "end to end" is units / the job's wall
  time, start-up and scoring included;
- per repeat, per kind: plain loop, job with 1 actor, job with 2 actors; every job ratio is taken against
  the plain loop of the same repeat, and the tables show medians (min-max).

Only `time`, /proc, Ray and the project's own code are used. Nothing is asserted on timings; every job must
write the same prediction files as the first (the evaluation is deterministic) and the actors' stamps must
count every unit, so each configuration did the same, whole work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (CORPORA, DOCS, ONE_RUN, REPO, Window, busy_share, cpu_ticks, emit, load_builders, loadavg,
                    quick_note, shown, work_folder, write_block)
from common import machine as machine_facts


BEGIN, END = "<!-- bench:eval:begin -->", "<!-- bench:eval:end -->"
SECTION = "# Benchmarks: evaluation"
MODEL_CONFIG = REPO / "configs" / "model" / "tiny.yaml"
BENCHMARKS = REPO / "configs" / "benchmarks.yaml"
KINDS = {"refseg": "refcoco-val", "panoptic": "coco-panoptic-val"}  # kind -> benchmark of configs/benchmarks.yaml
STAGES = ("read", "items", "preprocess", "forward", "post")
STAGE_NAMES = {
    "read": "read the record",
    "items": "evaluation items",
    "preprocess": "preprocess",
    "forward": "model forward",
    "post": "post-processing",
}
QUICK = {"refseg_images": 2, "panoptic_records": 4, "repeats": 1}


# ---- inputs -----------------------------------------------------------------------------------


def build_refcoco(corpora: Path, out: Path, n: int) -> dict[str, Path]:
    """The RefCOCO example (dataprep/examples/refer.py: the real image 39769 with its real annotations and
    the example's hand-written val expressions) with the image replicated under ids 1..n."""
    from dataprep.examples import refer

    doc = refer.instances_doc(corpora)
    (image0,) = [i for i in doc["images"] if i["id"] == refer.POLY_IMAGE]
    anns0 = [a for a in doc["annotations"] if a["image_id"] == refer.POLY_IMAGE]
    val = [(ann, raws) for split, ann, raws in refer.REFCOCO if split == "val"]
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    data = (corpora / "coco_instances_polygons" / "val2017" / image0["file_name"]).read_bytes()
    ext = image0["file_name"].rsplit(".", 1)[1]
    images, annotations, refs = [], [], []
    sent_id = 0
    for i in range(1, n + 1):
        name = f"{i:012d}.{ext}"
        (images_dir / name).write_bytes(data)
        images.append({**image0, "id": i, "file_name": name})
        new_id = {a["id"]: i * 1000 + k for k, a in enumerate(anns0)}
        annotations += [{**copy.deepcopy(a), "id": new_id[a["id"]], "image_id": i} for a in anns0]
        for ann, raws in val:
            sentences = [{"sent_id": sent_id + j, "raw": raw, "sent": raw.lower(), "tokens": raw.lower().split()}
                         for j, raw in enumerate(raws)]
            sent_id += len(raws)
            category = next(a["category_id"] for a in anns0 if a["id"] == ann)
            refs.append({"ref_id": len(refs), "ann_id": new_id[ann], "image_id": i, "category_id": category,
                         "split": "val", "file_name": f"{i:012d}_{new_id[ann]}.{ext}",
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
    instances = out / "instances.json"
    instances.write_text(json.dumps({**doc, "images": images, "annotations": annotations}))
    refs_file = out / "refs(unc).p"
    refs_file.write_bytes(refer.py2_pickle(refs))
    return {"refs": refs_file, "instances": instances, "images": images_dir}


def build_datasets(root: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """{dataset name: folder}: for each kind its dataset of SIZE records and a one-record warm-up copy."""
    from dataprep.convert import ConvertParams

    builders = load_builders()
    out = {}
    for suffix, scale in (("", None), ("-warmup", 1)):
        n = sizes["refseg"] if scale is None else scale
        if "refseg" in sizes:
            inputs = build_refcoco(CORPORA, root / f"in-refcoco{suffix}", n)
            out[f"refcoco{suffix}"] = builders.convert_local("refcoco", root / f"refcoco{suffix}", inputs,
                                                             ConvertParams())
        n = sizes.get("panoptic", 1) if scale is None else scale
        if "panoptic" in sizes:
            inputs = builders.build_panoptic(CORPORA, root / f"in-panoptic{suffix}", n)
            out[f"coco-panoptic{suffix}"] = builders.convert_local("coco-panoptic", root / f"coco-panoptic{suffix}",
                                                                   inputs, ConvertParams())
    for folder in root.glob("in-*"):
        shutil.rmtree(folder)
    return out


def benchmark_file(root: Path, datasets: dict[str, Path]) -> Path:
    """configs/benchmarks.yaml's entries of KINDS (and a `-warmup` copy of each) over DATASETS."""
    import yaml

    doc = yaml.safe_load(BENCHMARKS.read_text())
    chosen = {}
    for name in KINDS.values():
        spec = doc["benchmarks"][name]
        for suffix in ("", "-warmup"):
            if f"{spec['dataset']}{suffix}" in datasets:
                chosen[f"{name}{suffix}"] = {**spec, "dataset": f"{spec['dataset']}{suffix}"}
    path = root / "benchmarks.yaml"
    path.write_text(yaml.safe_dump({"root": str(root), "benchmarks": chosen}))
    return path


def build_model(root: Path) -> Path:
    """The tiny stage-3 model, random init (seed 0), as an inference folder (tests/jobs/test_evaluate.py)."""
    import torch

    from xsam.model.build import build_xsam
    from xsam.model.config import load_model_config
    from xsam.model.export import save_inference
    from xsam.text import build_tiny_tokenizer, load_tokenizer

    cfg = load_model_config(MODEL_CONFIG)
    tokenizer = load_tokenizer(build_tiny_tokenizer(root / "tokenizer"))
    torch.manual_seed(0)
    model = build_xsam(cfg, stage="stage3", tokenizer=tokenizer)
    return save_inference(model, cfg, tokenizer, root / "tiny-stage3", stage="stage3",
                          provenance={"kind": "benchmark", "seed": 0})


def units_of(config: Path, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The benchmark's units and the actor's view of it, as `run_evaluation` builds them."""
    from jobs.evaluate import _ground_truth, _units, load_benchmarks

    (bench,) = load_benchmarks([name], config=config)
    gt = _ground_truth(bench, bench.spec.views()[0])
    args = {"dataset": bench.dataset, "task": bench.spec.task, "score_task": gt.task, "categories": gt.categories,
            "ground_truth": bench.spec.ground_truth}
    return _units(bench, gt), {name: args}


# ---- the plain loop (the floor) -----------------------------------------------------------------


class _Clock:
    """Seconds per stage of the current unit."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)

        return wrapper


class _TimedReader:
    """A `RecordReader` whose `get` is timed (reading and verifying the shard, parsing the record)."""

    def __init__(self, reader: Any, clock: _Clock) -> None:
        self.reader, self.get = reader, clock.timed("read", reader.get)


def make_actor(model: Path, benchmarks: dict[str, Any]) -> tuple[Any, _Clock]:
    """`PredictActor` in this process, with its stages timed: the record read (its reader), `forward_item`
    and the model's forward (forward hooks). The predictions are unchanged."""
    from jobs.evaluate import PredictActor
    from xsam.data.shards import RecordReader

    actor = PredictActor(str(model), benchmarks, num_threads=1)
    clock = _Clock()
    for b in benchmarks.values():
        actor.readers[b["dataset"]] = _TimedReader(RecordReader(b["dataset"]), clock)
    predictor = actor.unit.predictor
    predictor.forward_item = clock.timed("forward_item", predictor.forward_item)
    started: list[float] = []
    model_ = predictor.loaded.model
    model_.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    model_.register_forward_hook(lambda *_: clock.add("forward", time.perf_counter() - started.pop()))
    return actor, clock


@contextlib.contextmanager
def _timed_items(clock: _Clock) -> Any:
    """Time `xsam.eval.groundtruth.evaluation_items` (the actor imports it at each call) in this process."""
    import xsam.eval.groundtruth as groundtruth

    original = groundtruth.evaluation_items
    groundtruth.evaluation_items = clock.timed("items", original)
    try:
        yield
    finally:
        groundtruth.evaluation_items = original


def plain_pass(actor: Any, clock: _Clock, units: list[dict[str, Any]]) -> dict[str, Any]:
    """Each unit through the actor's `__call__` in turn; per-stage seconds summed over the units."""
    stages = dict.fromkeys(STAGES, 0.0)
    payloads = {}
    ticks0, c0, t0 = cpu_ticks(), time.process_time(), time.perf_counter()
    with _timed_items(clock):
        for u in units:
            clock.spent = {}
            t = time.perf_counter()
            out = actor({"bench": [u["bench"]], "shard": [u["shard"]], "key": [u["key"]], "item": [u["item"]]})
            total = time.perf_counter() - t
            if out["error"][0]:
                raise RuntimeError(f"plain loop: unit {out['unit'][0]} failed: {out['error'][0]}")
            payloads[out["unit"][0]] = (out["payload"][0], out["png"][0])
            s = clock.spent
            stages["read"] += s.get("read", 0.0)
            stages["items"] += s.get("items", 0.0)
            stages["forward"] += s.get("forward", 0.0)
            stages["preprocess"] += s.get("forward_item", 0.0) - s.get("forward", 0.0)
            stages["post"] += total - s.get("read", 0.0) - s.get("items", 0.0) - s.get("forward_item", 0.0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    busy = busy_share(ticks0, cpu_ticks())
    machine_cores = None if busy is None else busy * (os.cpu_count() or 1)
    return {"wall_s": wall, "cpu_s": cpu, "stages_s": stages, "payloads": payloads,
            "own_cores": cpu / wall, "others_cores": None if machine_cores is None else max(0.0, machine_cores - cpu / wall)}


# ---- the job --------------------------------------------------------------------------------------


PHASES: dict[str, float] = {}
STARTS: dict[str, float] = {}  # phase -> when it was last entered (time.time(): the actors' clock too)
STAMPS_ENV = "XSAM_BENCH_EVAL_STAMPS"
_PHASE_FUNCTIONS = {"_ground_truth": "ground truth", "resolve_checkpoint": "model folder",
                    "_collect": "predict", "_write_predictions": "write predictions", "_pictures": "pictures"}


def stamp_actor_units() -> None:
    """Ray worker set-up hook: in every worker, `PredictActor` notes when it was constructed and loaded, and
    when each unit started and ended, one JSON line per event in $XSAM_BENCH_EVAL_STAMPS/PID.jsonl (the
    predictions are unchanged). Rows reach the driver in bursts per block of units, later than they were
    computed, so only the actors themselves can say when they were busy."""
    import json
    import os
    import time

    folder = os.environ.get(STAMPS_ENV)
    if not folder:
        return
    import jobs.evaluate as job

    cls = job.PredictActor
    if getattr(cls, "_bench_stamped", False):
        return
    init, call = cls.__init__, cls.__call__

    def note(event: dict) -> None:
        try:  # a stamp that cannot be written is missing from the figures, never a failed unit
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"pid": os.getpid(), **event}) + "\n")
        except OSError:
            pass

    def stamped_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        born = time.time()
        init(self, *args, **kwargs)
        note({"born": born, "ready": time.time()})

    def stamped_call(self, batch):  # type: ignore[no-untyped-def]
        start = time.time()
        out = call(self, batch)
        note({"start": start, "end": time.time(), "units": len(out["unit"])})
        return out

    cls.__init__, cls.__call__, cls._bench_stamped = stamped_init, stamped_call, True


def install_phase_timers() -> None:
    """Time the phases of `run_evaluation` by wrapping the functions it calls (behaviour unchanged)."""
    import jobs.evaluate as job
    import xsam.eval.score as scoring

    def wrap(module: Any, name: str, phase: str) -> None:
        fn = getattr(module, name)
        if getattr(fn, "_bench_timed", False):
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = STARTS[phase] = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                PHASES[phase] = PHASES.get(phase, 0.0) + time.time() - t0

        wrapper._bench_timed = True  # type: ignore[attr-defined]
        setattr(module, name, wrapper)

    for name, phase in _PHASE_FUNCTIONS.items():
        wrap(job, name, phase)
    wrap(scoring, "score", "score")  # run_evaluation imports it from the module at each call


def job_pass(model: Path, config: Path, name: str, actors: int, out: Path, stamps: Path) -> dict[str, Any]:
    from jobs.evaluate import run_evaluation

    PHASES.clear()
    STARTS.clear()
    shutil.rmtree(stamps, ignore_errors=True)
    stamps.mkdir(parents=True)
    window = Window()
    t0 = time.time()
    result = run_evaluation(str(model), [name], out=out, config=config, num_actors=actors, progress=False,
                            log=lambda msg: None)
    wall = time.time() - t0
    machine = window.stop()
    if result.failures.get(name):
        raise RuntimeError(f"{name} with {actors} actor(s): {result.failures[name]} unit(s) failed; see {out}")
    return {"wall_s": wall, "phases_s": dict(PHASES), "actors": actor_stamps(stamps, STARTS["predict"]),
            "scores": result.scores[name], "own_cores": machine["own_cores"], "others_cores": machine["others_cores"],
            "predictions": _predictions(out / name)}


def actor_stamps(folder: Path, predict_start: float) -> list[dict[str, Any]]:
    """Per actor of one job, from its stamps: start-up (from the predict phase's start until the model was
    loaded), model load, units, the span from its first unit's start to its last unit's end, busy seconds."""
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ready = [e for e in events if "ready" in e]
        calls = [e for e in events if "start" in e]
        if not ready or not calls:
            continue
        out.append({
            "pid": events[0]["pid"],
            "startup_s": ready[0]["ready"] - predict_start,
            "model_load_s": ready[0]["ready"] - ready[0]["born"],
            "units": sum(e["units"] for e in calls),
            "span_s": max(e["end"] for e in calls) - min(e["start"] for e in calls),
            "busy_s": sum(e["end"] - e["start"] for e in calls),
        })
    return out


def _predictions(folder: Path) -> dict[str, str]:
    """The job's prediction files (and panoptic PNGs), by name, for the identity check."""
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".json", ".png")
            and not p.name.startswith(("per-class", "samples", "failures"))}


def steady_rate(actors: list[dict[str, Any]]) -> float:
    """Items/s of the pool once its actors are up: the sum over the actors of the units each predicted over
    the span from its first unit's start to its last unit's end (Ray Data's hand-over between batches
    included, the start-up not)."""
    return sum(a["units"] / a["span_s"] for a in actors if a["span_s"] > 0)


# ---- the run ----------------------------------------------------------------------------------


@dataclass
class KindRun:
    kind: str
    benchmark: str
    units: int
    records: int
    plain: list[dict] = field(default_factory=list)
    jobs: dict[int, list[dict]] = field(default_factory=dict)  # actors -> one per repeat
    model_load_s: float = 0.0
    predictions: dict[str, str] | None = None  # the first job's prediction files: every job must match them


def machine() -> dict[str, str]:
    import ray
    import torch

    return machine_facts(ray=ray.__version__, torch=torch.__version__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = work_folder(args.out, "xsam-bench-eval")
    try:
        return _run(args, root)
    finally:
        shutil.rmtree(root if args.out is None else root / "runs", ignore_errors=True)


def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import ray
    import torch

    started = time.perf_counter()
    load_start, ticks_start = loadavg(), cpu_ticks()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else (lambda msg: None)
    sizes = {k: v for k, v in (("refseg", args.refseg_images), ("panoptic", args.panoptic_records)) if k in args.kinds}
    datasets = build_datasets(root / "data", sizes)
    config = benchmark_file(root / "data", datasets)
    model = build_model(root / "model")
    setup_s = time.perf_counter() - started
    log(f"inputs and model built in {setup_s:.1f} s")
    install_phase_timers()
    runs = root / "runs"
    counter = 0

    def fresh() -> Path:
        nonlocal counter
        counter += 1
        return runs / f"{counter:03d}"

    kinds: list[KindRun] = []
    threads = torch.get_num_threads()
    if not args.verbose:  # Ray Data announces every execution on the driver's log (configured on import)
        import ray.data  # noqa: F401

        logging.getLogger("ray.data").setLevel(logging.WARNING)
    t = time.perf_counter()
    stamps = root / "stamps"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=args.verbose,
             runtime_env={"worker_process_setup_hook": stamp_actor_units, "env_vars": {STAMPS_ENV: str(stamps)}})
    ray_s = time.perf_counter() - t
    try:
        # warm-up (untimed), one job over the one-record copies: Ray's workers, the driver's imports (scoring,
        # pictures), the page cache
        from jobs.evaluate import run_evaluation

        stamps.mkdir(parents=True, exist_ok=True)

        run_evaluation(str(model), [f"{KINDS[kind]}-warmup" for kind in args.kinds], out=fresh(), config=config,
                       progress=False, log=lambda msg: None)
        log(f"Ray started in {ray_s:.1f} s and warmed up in {time.perf_counter() - t - ray_s:.1f} s")
        for kind in args.kinds:
            name = KINDS[kind]
            units, bench_args = units_of(config, name)
            t = time.perf_counter()
            actor, clock = make_actor(model, bench_args)
            run_ = KindRun(kind, name, len(units), len({u["key"] for u in units}),
                           model_load_s=time.perf_counter() - t)
            plain_pass(actor, clock, units[:1])  # warm-up: shards verified, caches
            for r in range(args.repeats):
                plain = plain_pass(actor, clock, units)
                reference = plain.pop("payloads")
                run_.plain.append(plain)
                msg = f"  repeat {r + 1}/{args.repeats} {kind}: plain {len(units) / plain['wall_s']:.2f}/s"
                for actors in args.actors:
                    res = job_pass(model, config, name, actors, fresh(), stamps)
                    if run_.predictions is None:
                        run_.predictions = res["predictions"]
                    elif res["predictions"] != run_.predictions:
                        raise RuntimeError(f"{name}: {actors} actor(s) predicted something else than the first job")
                    stamped = sum(a["units"] for a in res["actors"])
                    if stamped != len(units):  # (with few units an actor may get none: it has no stamps)
                        raise RuntimeError(f"{name}: the actors' stamps count {stamped} units, for {len(units)}")
                    run_.jobs.setdefault(actors, []).append(res)
                    msg += f", {actors} actor(s) {len(units) / res['wall_s']:.2f}/s end to end"
                log(msg)
                if len(reference) != len(units):
                    raise RuntimeError(f"{name}: the plain loop predicted {len(reference)} of {len(units)} units")
            del actor
            kinds.append(run_)
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)

    return {
        "args": {"refseg_images": args.refseg_images, "panoptic_records": args.panoptic_records,
                 "repeats": args.repeats, "actors": args.actors, "kinds": args.kinds, "quick": args.quick},
        "machine": machine(),
        "stage_names": STAGE_NAMES,
        "kinds": [summarize(k) for k in kinds],
        "phases_s": {"setup": setup_s, "ray_init": ray_s},
        "total_s": time.perf_counter() - started,
        "load": {"start": load_start, "end": loadavg(), "busy": busy_share(ticks_start, cpu_ticks())},
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(run: KindRun) -> dict[str, Any]:
    n = run.units
    plain_rates = [n / p["wall_s"] for p in run.plain]
    stages = {s: statistics.median(p["stages_s"][s] / n for p in run.plain) for s in STAGES}
    unit_s = sum(stages.values())
    out: dict[str, Any] = {
        "kind": run.kind, "benchmark": run.benchmark, "units": n, "records": run.records,
        "model_load_s": run.model_load_s,
        "plain": {"items_per_s": statistics.median(plain_rates),
                  "cpu_ms": statistics.median(1000 * p["cpu_s"] / n for p in run.plain),
                  "stages_ms": {s: 1000 * v for s, v in stages.items()},
                  "stage_share": {s: v / unit_s for s, v in stages.items()},
                  "forward_items_per_s": 1 / stages["forward"] if stages["forward"] else None,
                  "others_cores": _median_or_none([p["others_cores"] for p in run.plain]),
                  "runs": run.plain},
        "jobs": [],
    }
    for actors, results in run.jobs.items():
        steady = [steady_rate(res["actors"]) for res in results]
        end_to_end = [n / res["wall_s"] for res in results]
        names = sorted({p for res in results for p in res["phases_s"]})
        phase_s = {p: statistics.median(res["phases_s"].get(p, 0.0) for res in results) for p in names}
        wall = statistics.median(res["wall_s"] for res in results)
        metrics_s = sum(phase_s.get(p, 0.0) for p in ("write predictions", "score", "pictures"))
        out["jobs"].append({
            "actors": actors,
            "items_per_s": _spread(steady),
            "ratio": _spread([r / p for r, p in zip(steady, plain_rates)]),
            "end_to_end_items_per_s": _spread(end_to_end),
            "end_to_end_ratio": _spread([e / p for e, p in zip(end_to_end, plain_rates)]),
            "startup_s": statistics.median(max(a["startup_s"] for a in res["actors"]) for res in results),
            "model_load_s": statistics.median(max(a["model_load_s"] for a in res["actors"]) for res in results),
            "busy_share": statistics.median(sum(a["busy_s"] for a in res["actors"]) / sum(a["span_s"] for a in
                                            res["actors"]) for res in results),
            "wall_s": wall,
            "phases_s": phase_s,
            "metrics_share": metrics_s / wall,
            "own_cores": _median_or_none([res["own_cores"] for res in results]),
            "others_cores": _median_or_none([res["others_cores"] for res in results]),
            "scores": results[0]["scores"],
            "runs": [{k: v for k, v in res.items() if k != "predictions"} for res in results],
        })
    return out


def _median_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# ---- report -----------------------------------------------------------------------------------


def _range(s: dict[str, float] | None, fmt: str = ".2f") -> str:
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:{fmt}}"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    a, m, busy = result["args"], result["machine"], result["load"]["busy"]
    sizes = ", ".join(f"{k['kind']} ({k['benchmark']}) {k['units']} items of {k['records']} records"
                      for k in result["kinds"])
    flags = "--quick" if a["quick"] else (f"--refseg-images {a['refseg_images']} --panoptic-records "
                                           f"{a['panoptic_records']} --repeats {a['repeats']}")
    lines = [
        f"{ONE_RUN}{quick_note(a['quick'])}",
        "",
        f"Run: `.venv/bin/python benchmarks/eval.py {flags} --write-docs` ({sizes}; the tiny stage-3 model, random "
        f"init; actors {', '.join(map(str, a['actors']))}, one CPU and one torch thread each); {m['nproc']} CPUs "
        f"({m['cpu']}), Python {m['python']}, Ray {m['ray']}, torch {m['torch']}; whole run {result['total_s']:.0f} s "
        f"(inputs and model {result['phases_s']['setup']:.0f} s, ray.init {result['phases_s']['ray_init']:.0f} s); "
        f"load average {result['load']['start']} at the start, {result['load']['end']} at the end"
        + (f", CPUs {100 * busy:.0f}% busy during the run." if busy is not None else "."),
        "",
        f"Items/s (median of {a['repeats']}, min-max; the plain loop is `PredictActor` called on each unit in this "
        "process, one torch thread, no Ray; every job ratio is against the plain loop of the same repeat):",
        "",
        "| kind (benchmark) | configuration | items | items/s steady | job / plain loop (min-max) | items/s end to end "
        "| end to end / plain loop | actor start-up s (constructing `PredictActor`: imports, model load) | actors busy "
        "(share of their span in `__call__`) | job wall s | post-processing + "
        "metrics share of the job | cores used | cores used by other processes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in result["kinds"]:
        p = k["plain"]
        lines.append(
            f"| {k['kind']} ({k['benchmark']}) | plain loop | {k['units']} | {p['items_per_s']:.2f} | 1 | "
            f"{p['items_per_s']:.2f} | - | - | - | {k['units'] / p['items_per_s']:.1f} | "
            f"{p['stage_share']['post']:.0%} (post-processing only) | 1.00 | {_cores(p['others_cores'])} |"
        )
        for j in k["jobs"]:
            lines.append(
                f"| {k['kind']} ({k['benchmark']}) | job, {j['actors']} actor{'s' if j['actors'] > 1 else ''} | "
                f"{k['units']} | {_range(j['items_per_s'])} | {_range(j['ratio'])} | "
                f"{_range(j['end_to_end_items_per_s'])} | {_range(j['end_to_end_ratio'])} | {j['startup_s']:.1f} "
                f"({j['model_load_s']:.1f}) | {j['busy_share']:.0%} | {j['wall_s']:.1f} | {j['metrics_share']:.0%} | {_cores(j['own_cores'])} | "
                f"{_cores(j['others_cores'])} |"
            )
    lines += [
        "",
        "Where a unit's time goes in the plain loop (ms per item, median of the repeats; share of the unit):",
        "",
        "| kind | " + " | ".join(STAGE_NAMES[s] for s in STAGES) + " | total | model forward alone, items/s "
        "| CPU ms per item | model load s |",
        "|---|" + "---:|" * (len(STAGES) + 4),
    ]
    for k in result["kinds"]:
        p = k["plain"]
        cells = " | ".join(f"{p['stages_ms'][s]:.1f} ({p['stage_share'][s]:.0%})" for s in STAGES)
        fwd = p["forward_items_per_s"]
        lines.append(f"| {k['kind']} | {cells} | {sum(p['stages_ms'].values()):.1f} | "
                     f"{'-' if fwd is None else f'{fwd:.1f}'} | {p['cpu_ms']:.0f} | {k['model_load_s']:.1f} |")
    phase_names = ["ground truth", "model folder", "predict", "write predictions", "score", "pictures"]
    lines += [
        "",
        "Phases of the job (s, median of the repeats; `predict` includes starting the actors and loading the "
        "model in each; the rest of the wall time is the Ray Data set-up and shutting the pool down):",
        "",
        "| kind | actors | " + " | ".join(phase_names) + " | other | wall |",
        "|---|---:|" + "---:|" * (len(phase_names) + 2),
    ]
    for k in result["kinds"]:
        for j in k["jobs"]:
            ph = j["phases_s"]
            other = j["wall_s"] - sum(ph.get(p, 0.0) for p in phase_names)
            lines.append(f"| {k['kind']} | {j['actors']} | "
                         + " | ".join(f"{ph.get(p, 0.0):.2f}" for p in phase_names)
                         + f" | {other:.2f} | {j['wall_s']:.1f} |")
    scores = "; ".join(
        f"{k['benchmark']} " + ", ".join(f"{m_} {v:.1f}" for m_, v in sorted(k["jobs"][0]["scores"].items()))
        for k in result["kinds"] if k["jobs"])
    lines += ["", f"Scores of the random model, in percent as `xsam eval` reports them (the same in every configuration, checked): {scores}."]
    return "\n".join(lines)


def write_docs(table: str) -> None:
    write_block(BEGIN, END, table, missing=f"{SECTION}\n\n## Results\n\n{BEGIN}\n{END}\n")


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--refseg-images", type=int, default=None,
                        help="images of the refcoco-val dataset, 4 items each (6 = 24 items)")
    parser.add_argument("--panoptic-records", type=int, default=None,
                        help="records of the coco-panoptic-val dataset, 1 item each (12)")
    parser.add_argument("--repeats", type=int, default=None, help="plain loop / job repeats per kind (2)")
    parser.add_argument("--actors", default="1,2", help="actor counts of the job (1,2)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"which benchmark kinds ({','.join(KINDS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced sizes, a check that it runs ({', '.join(f'{k}={v}' for k, v in QUICK.items())})")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--write-docs", action="store_true", help=f"update the results in {shown(DOCS)}")
    parser.add_argument("--json", default=None, help="also write the raw results (every timing) to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each measurement to stderr")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"refseg_images": 6, "panoptic_records": 12, "repeats": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.actors = _int_list(args.actors)
    except ValueError:
        parser.error(f"--actors: expected comma-separated integers, got {args.actors!r}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.kinds or set(args.kinds) - set(KINDS):
        parser.error(f"--kinds: a comma-separated subset of {','.join(KINDS)}")
    if min(args.refseg_images, args.panoptic_records, args.repeats, *args.actors) < 1 or max(args.actors) > 2:
        parser.error("sizes and repeats must be >= 1; --actors between 1 and 2 (Ray runs with 2 CPUs)")
    result = run(args)
    emit(markdown(result), result, args.json, write_docs if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
