"""`xsam eval --checkpoint CKPT --benchmarks A,B`: evaluate a model on X-SAM's benchmarks with Ray.

1. Benchmarks resolve through `configs/benchmarks.yaml` (`BenchmarkSpec`: dataset folder, task, split,
   metrics, ground-truth view, the paper's numbers). The driver reads each benchmark's ground truth
   (`xsam.eval.groundtruth`) and cuts it into units: a record (genseg, ovseg, vgdseg, gcgseg) or an
   evaluation item (refseg, grefseg, reaseg, intseg).
2. A Ray Data `map_batches` over the units runs an actor pool (`--num-actors`); each actor loads the
   model once (`load_inference`; an s3:// folder, a training checkpoint or `runs:/RUN_ID` is fetched
   first, as a recipe's parent is), reads its records from the shards (`RecordReader`), and predicts
   (`xsam.eval.infer`). Prompts are the evaluation renderings (fixed seed, template 0) and the region
   sampler is seeded, so two runs of one checkpoint give identical predictions and scores. A unit that
   raises is recorded (`failures.json`, the `<benchmark>/failed` metric) and scored as an empty
   prediction: it lowers the score, it never aborts the benchmark and is never silently dropped.
3. The driver writes the predictions in the reference formats (`xsam.eval.predictions`) under
   `OUT/<benchmark>/`, scores them with `xsam.eval.score` (the code `xsam eval score` runs), and writes
   `OUT/scores.json` = `{benchmark: {metric: value}}`.
4. One MLflow run per evaluation (a child of `--parent-run-id`, e.g. a workflow's run): tag
   `xsam.training_run_id` links the checkpoint's training run, metrics are `<benchmark>/<metric>`, each
   benchmark's dataset is an input with its digest (the manifest's sha256), and the artifacts are the
   scores, the predictions, a grid of the best and worst samples and a per-class plot per view.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_BENCHMARKS = Path(__file__).resolve().parents[1] / "configs" / "benchmarks.yaml"
VIEW_METRICS = {
    "panoptic": ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"),
    "semantic": ("mIoU", "fwIoU", "mACC", "pACC"),
    "instance": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
}
UNIT_PER_ITEM = ("refseg", "grefseg", "reaseg", "intseg")


class BenchmarkError(ValueError):
    """A benchmark that cannot be resolved: unknown name, bad config, missing dataset."""


class EvaluationError(RuntimeError):
    """The evaluation could not run (e.g. the model does not load in the actors)."""


class BenchmarkSpec(BaseModel):
    """One entry of configs/benchmarks.yaml."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = Field(description="dataset folder (relative to the file's root) or s3://")
    task: Literal["genseg", "ovseg", "refseg", "grefseg", "reaseg", "gcgseg", "intseg", "vgdseg"]
    split: str
    metrics: list[str] = Field(default_factory=list, description="reported metrics (all when empty)")
    ground_truth: dict[str, Any] = Field(default_factory=dict)
    text_model: str | None = Field(default=None, description="gcgseg: local BERT folder for phrase recall")
    paper: dict[str, float] = Field(default_factory=dict, description="X-SAM's published numbers")

    def views(self) -> list[str]:
        """Score tasks of the benchmark (genseg/ovseg: the views its metrics need)."""
        if self.task not in ("genseg", "ovseg"):
            return [self.task]
        wanted = [v for v, names in VIEW_METRICS.items() if not self.metrics or set(names) & set(self.metrics)]
        return [f"{self.task}-{v}" for v in wanted]


class BenchmarkFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = "."
    benchmarks: dict[str, BenchmarkSpec]

    @field_validator("benchmarks")
    @classmethod
    def _names(cls, value: dict[str, BenchmarkSpec]) -> dict[str, BenchmarkSpec]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"benchmark name {name!r} may only use letters, digits and _ . - (MLflow metric names)")
        return value


@dataclass(kw_only=True, slots=True)
class Benchmark:
    name: str
    spec: BenchmarkSpec
    dataset: str  # resolved path or URI


def load_benchmarks(names: list[str], *, config: str | Path = DEFAULT_BENCHMARKS,
                    data_root: str | None = None) -> list[Benchmark]:
    """Resolve benchmark names through the config; dataset paths are joined to `data_root` (default:
    the file's `root`, relative to the current directory)."""
    path = Path(config)
    try:
        doc = yaml.safe_load(path.read_text())
        parsed = BenchmarkFile.model_validate(doc)
    except FileNotFoundError:
        raise BenchmarkError(f"benchmark file {path} does not exist") from None
    except (yaml.YAMLError, ValidationError) as err:
        raise BenchmarkError(f"{path}: {err}") from None
    root = data_root if data_root is not None else parsed.root
    if not names:
        raise BenchmarkError(f"name at least one benchmark; {path} defines {', '.join(parsed.benchmarks)}")
    out = []
    for name in names:
        spec = parsed.benchmarks.get(name)
        if spec is None:
            raise BenchmarkError(f"unknown benchmark {name!r}; {path} defines {', '.join(parsed.benchmarks)}")
        dataset = spec.dataset if "://" in spec.dataset or Path(spec.dataset).is_absolute() else (
            f"{root.rstrip('/')}/{spec.dataset}" if "://" in root else str(Path(root) / spec.dataset))
        out.append(Benchmark(name=name, spec=spec, dataset=dataset))
    if len({b.name for b in out}) != len(out):
        raise BenchmarkError("a benchmark is named twice")
    return out


def _ground_truth(bench: Benchmark, score_task: str):
    from xsam.eval.groundtruth import View, load_ground_truth

    view = View.from_mapping(bench.spec.ground_truth, f"benchmark {bench.name}")
    return load_ground_truth(score_task, bench.dataset, split=bench.spec.split, view=view)


# ------------------------------------------------------------------------------------ the actor


def resolve_checkpoint(checkpoint: str, into: Path) -> tuple[Path, str | None]:
    """(local inference folder, the MLflow run that trained it) for a local / s3:// inference folder,
    a training checkpoint or `runs:/RUN_ID` (that run's last checkpoint)."""
    from jobs.train import fetch_parent  # its run id: runs:/ID, or the folder's xsam.json / trainer.json

    return fetch_parent(checkpoint, into, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))


class PredictActor:
    """Ray Data callable class: the model is loaded once per actor; each row is one unit."""

    def __init__(self, checkpoint: str, benchmarks: dict[str, dict[str, Any]], num_threads: int = 1) -> None:
        """`checkpoint`: a local inference folder (the driver resolved the user's checkpoint into one)."""
        import torch

        from xsam.eval.infer import UnitPredictor
        from xsam.model.export import load_inference
        from xsam.model.predict import Predictor

        torch.set_num_threads(max(1, num_threads))
        self.unit = UnitPredictor(Predictor(load_inference(checkpoint)))
        self.benchmarks = benchmarks
        self.readers: dict[str, Any] = {}
        self.views: dict[str, Any] = {}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        from xsam.data.shards import RecordReader
        from xsam.eval.groundtruth import View, evaluation_items

        out: dict[str, list[Any]] = {"bench": [], "unit": [], "payload": [], "png": [], "error": []}
        for bench, shard, key, index in zip(batch["bench"], batch["shard"], batch["key"], batch["item"]):
            bench, index = str(bench), int(index)
            b = self.benchmarks[bench]
            payload, png, error = "", b"", ""
            unit = f"{key}#{index}" if b["task"] in UNIT_PER_ITEM else str(key)
            try:
                reader = self.readers.get(b["dataset"])
                if reader is None:
                    reader = self.readers[b["dataset"]] = RecordReader(b["dataset"])
                stored = reader.get(str(shard), str(key))
                view = self.views.get(bench)
                if view is None:
                    view = self.views[bench] = View.from_mapping(b["ground_truth"], bench)
                record, items = evaluation_items(b["score_task"], stored.record, view=view, categories=b["categories"])
                item = items[index]
                task = b["task"]
                if task in ("genseg", "ovseg"):
                    result = self.unit.genseg(record, item, stored.image, b["categories"],
                                              thing_ids=set(b["ground_truth"].get("thing_category_ids") or []) or None)
                    png = result["panoptic"].pop("png")
                elif task in UNIT_PER_ITEM:
                    result = self.unit.referring(task, record, item, stored.image)
                elif task == "vgdseg":
                    result = self.unit.vgdseg(record, item, stored.image)
                else:
                    result = self.unit.gcgseg(record, item, stored.image)
                payload = json.dumps(result)
            except Exception as exc:  # recorded per unit: one bad sample never stops the benchmark
                error = f"{type(exc).__name__}: {exc}"[:2000]
            out["bench"].append(bench)
            out["unit"].append(unit)
            out["payload"].append(payload)
            out["png"].append(png)
            out["error"].append(error)
        return out


# ------------------------------------------------------------------------------------ the driver


@dataclass(kw_only=True)
class EvaluationResult:
    scores: dict[str, dict[str, float]]
    out: Path
    run_id: str | None
    failures: dict[str, int] = field(default_factory=dict)
    reports: dict[str, list[Any]] = field(default_factory=dict)


def _units(bench: Benchmark, gt: Any) -> list[dict[str, Any]]:
    units = []
    for record, shard in zip(gt.records, gt.shards):
        count = len(gt.evaluation_items(record)[1]) if bench.spec.task in UNIT_PER_ITEM else 1
        units += [{"bench": bench.name, "shard": shard, "key": record.key, "item": i} for i in range(count)]
    return units


def _write_predictions(bench: Benchmark, rows: list[dict[str, Any]], folder: Path) -> dict[str, Path]:
    """The benchmark's prediction files (per score task), from the actors' rows, in unit order."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = sorted((r for r in rows if not r["error"]), key=lambda r: r["unit"])
    task = bench.spec.task
    files: dict[str, Path] = {}
    if task in ("genseg", "ovseg"):
        results = [json.loads(r["payload"]) for r in ok]
        png_dir = folder / "panoptic"
        png_dir.mkdir(exist_ok=True)
        annotations = []
        for r, res in zip(ok, results):
            name = f"{r['unit']}.png"
            (png_dir / name).write_bytes(r["png"])
            annotations.append({"image_id": res["panoptic"]["image_id"], "file_name": name,
                                "segments_info": res["panoptic"]["segments_info"]})
        files[f"{task}-panoptic"] = _dump(folder / "panoptic.json", {"annotations": annotations})
        files[f"{task}-semantic"] = _dump(folder / "semantic.json", [e for res in results for e in res["semantic"]])
        files[f"{task}-instance"] = _dump(folder / "instance.json", [e for res in results for e in res["instance"]])
    elif task in UNIT_PER_ITEM:
        files[task] = _dump(folder / "masks.json", [json.loads(r["payload"]) for r in ok])
    elif task == "vgdseg":
        files[task] = _dump(folder / "instance.json", [e for r in ok for e in json.loads(r["payload"])])
    else:
        files[task] = _dump(folder / "gcg.json", [json.loads(r["payload"]) for r in ok])
    failures = [{"unit": r["unit"], "error": r["error"]} for r in sorted(rows, key=lambda r: r["unit"]) if r["error"]]
    _dump(folder / "failures.json", failures)
    return files


def _dump(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, sort_keys=True) + "\n")
    return path


def run_evaluation(
    checkpoint: str,
    benchmark_names: list[str],
    *,
    out: str | Path,
    config: str | Path = DEFAULT_BENCHMARKS,
    data_root: str | None = None,
    num_actors: int = 1,
    cpus_per_actor: int = 1,
    address: str | None = None,
    tracking: Any | None = None,
    parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate `checkpoint` on the named benchmarks (see the module docstring); `tracking` is a
    `jobs.tracking.TrackingTarget` or None (untracked)."""
    import ray

    from jobs.submit import init_ray
    from xsam.eval.score import score

    benches = load_benchmarks(benchmark_names, config=config, data_root=data_root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truths: dict[str, dict[str, Any]] = {}
    units: list[dict[str, Any]] = []
    for bench in benches:
        views = bench.spec.views()
        read = _ground_truth(bench, views[0])  # the records once; genseg's other views share them
        per_view = {task: dataclasses.replace(read, task=task) for task in views}
        truths[bench.name] = per_view
        units += _units(bench, next(iter(per_view.values())))
    # resolved once, here (a training checkpoint is consolidated, an s3:// folder downloaded): the actors
    # load the local folder, so on a cluster OUT must be a folder every node sees (as `xsam train --storage`)
    model_dir, training_run = resolve_checkpoint(checkpoint, out / "model")
    actor_args = {}
    for bench in benches:
        gt = next(iter(truths[bench.name].values()))
        actor_args[bench.name] = {"dataset": bench.dataset, "task": bench.spec.task, "score_task": gt.task,
                                  "categories": gt.categories,
                                  "ground_truth": bench.spec.ground_truth}

    tracker, run_id = _start_tracking(tracking, checkpoint, benches, truths, training_run, parent_run_id, log)
    started = init_ray(address, num_cpus=max(2, num_actors * cpus_per_actor))
    rows: dict[str, list[dict[str, Any]]] = {b.name: [] for b in benches}
    status = "FAILED"
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True
        ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 4 * num_actors)))
        ds = ds.map_batches(PredictActor, fn_constructor_kwargs={"checkpoint": str(model_dir.resolve()),
                                                                 "benchmarks": actor_args,
                                                                 "num_threads": cpus_per_actor},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=num_actors),
                            num_cpus=cpus_per_actor)
        try:
            _collect(ds, rows, {b.name: sum(1 for u in units if u["bench"] == b.name) for b in benches}, progress)
        except ray.exceptions.ActorDiedError as exc:  # the model did not load: say why, not Ray's whole trace
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            raise EvaluationError(f"the evaluation actors could not load {model_dir}: {lines[-1] if lines else exc}") from None
        scores: dict[str, dict[str, float]] = {}
        failures: dict[str, int] = {}
        reports: dict[str, list[Any]] = {}
        for bench in benches:
            files = _write_predictions(bench, rows[bench.name], out / bench.name)
            failures[bench.name] = sum(1 for r in rows[bench.name] if r["error"])
            merged: dict[str, float] = {}
            reports[bench.name] = []
            for task, gt in truths[bench.name].items():
                report = score(task, bench.dataset, files[task], ground_truth=gt,
                               text_model=bench.spec.text_model)
                reports[bench.name].append(report)
                merged.update(report.scores)
            wanted = bench.spec.metrics
            scores[bench.name] = {k: v for k, v in merged.items() if not wanted or k in wanted}
            _pictures(bench, reports[bench.name], truths[bench.name], out / bench.name)
            if failures[bench.name]:
                log(f"{bench.name}: {failures[bench.name]} unit(s) failed (scored as empty); see "
                    f"{out / bench.name / 'failures.json'}")
        _dump(out / "scores.json", scores)
        if tracker is not None:
            _log_results(tracker, benches, scores, failures, out)
        status = "FINISHED"
        return EvaluationResult(scores=scores, out=out, run_id=run_id, failures=failures, reports=reports)
    finally:
        if tracker is not None:
            tracker.terminate(status)
            tracker.close(timeout=60)
        if started:
            ray.shutdown()


def _collect(ds: Any, rows: dict[str, list[dict[str, Any]]], totals: dict[str, int], progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # on stderr: stdout is for results (`xsam eval --json`)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=not progress, transient=False) as bar:
        tasks = {name: bar.add_task(f"eval {name}", total=total) for name, total in totals.items()}
        for row in ds.iter_rows():
            name = str(row["bench"])
            rows[name].append({k: row[k] for k in ("unit", "payload", "png", "error")})
            bar.advance(tasks[name])


def _start_tracking(tracking: Any, checkpoint: str, benches: list[Benchmark], truths: dict[str, dict[str, Any]],
                    training_run: str | None, parent_run_id: str | None, log: Callable[[str], None]):
    if tracking is None:
        return None, None
    from jobs.tracking import Tracker, dataset_input, start_run

    tags = {"xsam.kind": "evaluation", "xsam.checkpoint": checkpoint,
            "xsam.benchmarks": ",".join(b.name for b in benches)}
    if training_run:
        tags["xsam.training_run_id"] = training_run
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    name = f"eval-{Path(checkpoint.rstrip('/')).name or 'model'}"
    run_id = start_run(tracking, run_name=name, tags=tags, on_error=log)
    if run_id is None:
        return None, None
    tracker = Tracker(tracking, run_id)
    tracker.log_params({"checkpoint": checkpoint, "benchmarks": ",".join(b.name for b in benches)})
    inputs = []
    for bench in benches:
        gt = next(iter(truths[bench.name].values()))
        inputs.append(dataset_input(name=bench.name, path=bench.dataset, version=gt.version, context="evaluation",
                                    profile={"task": gt.task, "split": gt.split, "records": len(gt.records)}))
    tracker.log_inputs(inputs)
    log(f"MLflow run {run_id} at {tracking.shown()} (experiment {tracking.experiment})")
    return tracker, run_id


def _pictures(bench: Benchmark, reports: list[Any], truths: dict[str, Any], folder: Path) -> list[Path]:
    """Per view: the per-class plot and (tasks scored per sample) the best / worst sample grid."""
    from xsam.eval.plots import per_class_plot, sample_grid

    made = []
    for report in reports:
        made.append(per_class_plot(report, folder / f"per-class-{report.task}.png", title=bench.name))
        predictions = folder / ("panoptic.json" if report.task.endswith("-panoptic") else "masks.json")
        made.append(sample_grid(report, truths[report.task], predictions, folder / f"samples-{report.task}.png",
                                title=bench.name))
    return [p for p in made if p is not None]


def _log_results(tracker: Any, benches: list[Benchmark], scores: dict[str, dict[str, float]],
                 failures: dict[str, int], out: Path) -> None:
    metrics = {f"{b}/{k}": v for b, values in scores.items() for k, v in values.items()}
    metrics.update({f"{b}/failed": float(n) for b, n in failures.items()})
    tracker.log_metrics(metrics, step=0)
    tracker.log_artifact(out / "scores.json")
    for bench in benches:
        folder = out / bench.name
        for picture in sorted(folder.glob("*.png")):
            tracker.log_artifact(picture, f"plots/{bench.name}")
        tracker.log_artifact(folder, f"predictions/{bench.name}")
