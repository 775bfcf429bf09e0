"""Running a workflow: the DAG walk, the cache and the step state; every step a plain `xsam` command.

For each step, in dependency order:
1. its inputs are resolved into one document (input files by content, dataset versions = manifest
   sha256, parent checkpoint ids, the resolved parameters, the code version of the packages it
   runs) whose digest is the step's cache key (`pipelines.cache`);
2. a succeeded record of that key whose outputs are still there means skip; otherwise the step's
   command runs: in this process on the embedded local Ray (or on a cluster this process drives,
   `--address HOST:PORT`), or as a Ray Job (`--address http://HEAD:8265`) whose runtime_env ships
   this project's packages and only non-secret settings;
3. the command writes its outcome with `--result-json` next to the step state; the record says
   succeeded or failed. A failed step stops the steps that depend on it; finished outputs stay.

A re-run reads the records back: finished steps skip, a step that failed or whose driver died runs
again and picks up inside itself (a training stage continues from its last checkpoint: its run name
is fixed by its key and it runs with `--resume auto`; a conversion re-uses its finished units; a Ray
Job still running on the cluster is followed rather than submitted twice).

MLflow: the workflow is one parent run (the workflow file, the plan and the final step table are
its artifacts); training and evaluation runs are its children (`--parent-run-id`), and conversion
and lint steps get a child run each from here.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from pipelines.cache import Fingerprints, StepStore, code_version, digest, package_dir
from pipelines.workflow import Workflow, WorkflowError, dependencies, downstream, order, substitute

# which of our packages each kind of step runs: a change there re-runs it (pipelines/, the command
# line and this runner, is glue and re-runs nothing)
CODE = {"convert": ("dataprep", "xsam"), "lint": ("dataprep", "xsam"), "train": ("xsam", "jobs"),
        "evaluate": ("xsam", "jobs")}
PACKAGES = ("xsam", "dataprep", "jobs", "pipelines")
# flags that change how fast a step runs, not what it makes
RESOURCE_OPTIONS = {"num-workers", "num_workers"}


class StepFailed(RuntimeError):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flags(mapping: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in mapping.items():
        flag = "--" + str(name).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def _file_sha(path: str) -> str | None:
    import hashlib

    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The leaf paths where two input documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changed(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [prefix or "(all)"]


@dataclass
class Prepared:
    """A step made concrete: its key, what the key is made of and its command."""

    key: str
    inputs: dict[str, Any]
    argv: list[str]  # `xsam ARGV` here
    job_argv: list[str]  # `xsam ARGV` as a Ray Job (paths into its working directory)
    files: dict[str, str] = field(default_factory=dict)  # working-directory name -> local path or "text:..."


@dataclass
class Decision:
    step: str
    action: str  # run | skip
    reason: str
    key: str | None = None
    command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "action": self.action, "reason": self.reason, "key": self.key,
                "command": self.command}


@dataclass
class Outcome:
    step: str
    status: str  # ran | skipped | failed | blocked | not-selected
    reason: str
    key: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0


class Runner:
    def __init__(self, workflow: Workflow, path: Path, *, address: str | None = None, tracking: bool = True,
                 start: str | None = None, only: str | None = None, console: Console | None = None,
                 max_parallel: int | None = None) -> None:
        self.workflow = workflow
        self.path = path
        self.address = address
        self.jobs_api = bool(address and address.startswith(("http://", "https://")))
        self.tracking = tracking
        self.console = console or Console(stderr=True)
        # local storage as an absolute path: a Ray Job runs in a directory of its own
        self.storage = self._local(workflow.storage)
        self.store = StepStore(self.storage, workflow.name)
        self.fingerprints = Fingerprints()
        self.order = order(workflow)
        if start and only:
            raise WorkflowError("give --from or --only, not both")
        if only:
            if only not in workflow.steps:
                raise WorkflowError(f"--only {only}: no such step; the steps are {', '.join(workflow.steps)}")
            self.selected = [only]
            self.selection_note = f"--only {only}"
        elif start:
            self.selected = downstream(workflow, start)
            self.selection_note = f"--from {start}"
        else:
            self.selected = list(self.order)
            self.selection_note = ""
        self.max_parallel = max_parallel or (4 if self.jobs_api else 1)
        self.parent_run_id: str | None = None
        self._codes: dict[str, dict[str, Any]] = {}
        self._check_dataset_order()

    def _check_dataset_order(self) -> None:
        """A step that reads a dataset another step converts must come after it (`needs`)."""
        def norm(path: str) -> str:
            return path.rstrip("/") if "://" in path else str(Path(path).resolve())

        made = {norm(s.convert.out): n for n, s in self.workflow.steps.items() if s.convert is not None}
        upstream: dict[str, set[str]] = {}
        for name in self.order:
            upstream[name] = set()
            for need in dependencies(self.workflow, name):
                upstream[name] |= {need} | upstream[need]
        for name, step in self.workflow.steps.items():
            if step.train is not None:
                from jobs.recipe import RecipeError, resolve_recipe

                sets = _set_overrides(step.train.set)
                try:
                    read = [s.path for s in resolve_recipe(step.train.recipe, sets).mixture().sources]
                except (RecipeError, FileNotFoundError) as err:
                    raise WorkflowError(f"step {name}: {err}") from None
            elif step.evaluate is not None:
                from jobs.evaluate import BenchmarkError, load_benchmarks

                try:
                    read = [b.dataset for b in load_benchmarks(step.evaluate.benchmarks, config=step.evaluate.config,
                                                               data_root=step.evaluate.data_root)]
                except BenchmarkError as err:
                    raise WorkflowError(f"step {name}: {err}") from None
            else:
                continue
            for dataset in read:
                maker = made.get(norm(dataset))
                if maker and maker not in upstream[name]:
                    raise WorkflowError(f"step {name} reads {dataset}, which step {maker} converts: add {maker} to "
                                        f"its needs (or a step that needs it)")

    # ----------------------------------------------------------------------------- resolution

    def _code(self, kind: str) -> dict[str, Any]:
        if kind not in self._codes:
            self._codes[kind] = code_version(CODE[kind])
        return self._codes[kind]

    def _local(self, value: str) -> str:
        """A local path as the Ray Job sees it (absolute); URIs unchanged."""
        if "://" in value or value.startswith("runs:/") or Path(value).is_absolute():
            return value
        return str(Path(value).resolve())

    def prepare(self, name: str, outputs: dict[str, dict[str, Any]]) -> Prepared:
        """The step with `${steps.*}` filled from `outputs`; raises WorkflowError when an input is
        not there (yet)."""
        step = self.workflow.steps[name]
        body = type(step.body).model_validate(substitute(step.body.model_dump(mode="json", by_alias=True), outputs))
        return getattr(self, f"_prepare_{step.kind}")(name, body)

    def _key_of(self, inputs: dict[str, Any]) -> str:
        return digest(inputs)[:24]

    def _prepare_convert(self, name: str, body: Any) -> Prepared:
        from jobs.outcome import dataset_version

        inputs = {
            "kind": "convert", "corpus": body.corpus, "out": body.out,
            "inputs": {k: self.fingerprints.value(v) for k, v in sorted(body.inputs.items())},
            "options": {k: v for k, v in sorted(body.options.items()) if k not in RESOURCE_OPTIONS},
            "code": self._code("convert"),
        }
        key = self._key_of(inputs)
        result = self.store.result_uri(name, key)
        tail = _flags(body.options) + ["--result-json", result]
        argv = ["data", "convert", body.corpus, "--out", body.out, *_flags(body.inputs), *tail]
        job_inputs = {k: self._local(v) if isinstance(v, str) and k not in ("split", "flavor") else v
                      for k, v in body.inputs.items()}
        job_argv = ["data", "convert", body.corpus, "--out", self._local(body.out), *_flags(job_inputs), *tail]
        # a folder that holds what an earlier run of this step made is ours to replace
        current = dataset_version(body.out)
        owned = any(r.get("status") != "succeeded" or (current and (r.get("result") or {}).get("version") == current)
                    for r in self.store.records(name) if r.get("inputs", {}).get("out") == body.out)
        prepared = Prepared(key=key, inputs=inputs, argv=argv, job_argv=job_argv)
        if owned:
            prepared.argv.append("--replace")
            prepared.job_argv.append("--replace")
        return prepared

    def _versions(self, name: str, datasets: list[str]) -> dict[str, str]:
        from jobs.outcome import dataset_version

        out = {}
        for dataset in datasets:
            version = dataset_version(dataset)
            if version is None:
                raise WorkflowError(f"step {name}: dataset {dataset} is not there (no manifest.parquet): convert it "
                                    "first (a convert step this step needs)")
            out[dataset] = version
        return out

    def _prepare_lint(self, name: str, body: Any) -> Prepared:
        inputs = {"kind": "lint", "datasets": self._versions(name, body.datasets), "verify": body.verify,
                  "code": self._code("lint")}
        key = self._key_of(inputs)
        tail = ["--verify", body.verify, "--result-json", self.store.result_uri(name, key)]
        return Prepared(key=key, inputs=inputs, argv=["data", "lint", *body.datasets, *tail],
                        job_argv=["data", "lint", *[self._local(d) for d in body.datasets], *tail])

    def _parent_id(self, uri: str) -> str:
        """What identifies a parent checkpoint: its trainer.json / xsam.json digest, or the URI."""
        from jobs.outcome import checkpoint_id
        from jobs.train import RunStorage

        if uri.startswith("runs:/"):
            return uri
        found = checkpoint_id(uri)
        if found:
            return found
        store = RunStorage.open(uri)
        meta = store.read_json(store.join("xsam.json"))
        if meta is None:
            raise WorkflowError(f"checkpoint {uri} is not there (neither trainer.json nor xsam.json)")
        return digest(meta)

    def _prepare_train(self, name: str, body: Any) -> Prepared:
        import yaml

        from jobs.recipe import RecipeError, resolve_recipe

        overrides = _set_overrides(body.set)
        if body.init is not None:
            overrides.append("init=" + json.dumps([i.model_dump(by_alias=True) for i in body.init]))
        try:
            recipe = resolve_recipe(body.recipe, overrides, repo_root=Path.cwd())
            sources = recipe.mixture().sources
        except (RecipeError, FileNotFoundError) as err:
            raise WorkflowError(f"step {name}: {err}") from None
        resolved = recipe.model_dump(mode="json", by_alias=True)
        inputs = {
            "kind": "train", "recipe": resolved, "model_config_sha256": _file_sha(recipe.model),
            "datasets": self._versions(name, [s.path for s in sources]),
            "parents": {s.from_: self._parent_id(s.from_) for s in recipe.init},
            "num_workers": body.num_workers, "code": self._code("train"),
        }
        key = self._key_of(inputs)
        run_name = f"{self.workflow.name}-{name}-{key[:12]}"
        tail = ["--storage", self.storage, "--name", run_name, "--resume", "auto",
                "--max-failures", str(body.max_failures), "--result-json", self.store.result_uri(name, key)]
        if body.num_workers:
            tail += ["--num-workers", str(body.num_workers)]
        if not self.tracking:
            tail.append("--no-tracking")
        sets = [a for o in overrides for a in ("--set", o)]
        return Prepared(key=key, inputs=inputs, argv=["train", body.recipe, *sets, *tail],
                        job_argv=["train", "recipe.yaml", *tail],
                        files={"recipe.yaml": "text:" + yaml.safe_dump(resolved, sort_keys=False)})

    def _prepare_evaluate(self, name: str, body: Any) -> Prepared:
        from jobs.evaluate import BenchmarkError, load_benchmarks

        try:
            benches = load_benchmarks(body.benchmarks, config=body.config, data_root=body.data_root)
        except BenchmarkError as err:
            raise WorkflowError(f"step {name}: {err}") from None
        inputs = {
            "kind": "evaluate", "checkpoint": {"uri": body.checkpoint, "id": self._parent_id(body.checkpoint)},
            "benchmarks": body.benchmarks, "config_sha256": _file_sha(body.config),
            "datasets": self._versions(name, [b.dataset for b in benches]), "code": self._code("evaluate"),
        }
        key = self._key_of(inputs)
        tail = ["--benchmarks", ",".join(body.benchmarks), "--num-actors", str(body.num_actors),
                "--cpus-per-actor", str(body.cpus_per_actor), "--result-json", self.store.result_uri(name, key)]
        if not self.tracking:
            tail.append("--no-tracking")
        root = ["--data-root", body.data_root] if body.data_root else []
        job_root = ["--data-root", self._local(body.data_root)] if body.data_root else []
        return Prepared(key=key, inputs=inputs,
                        argv=["eval", "--checkpoint", body.checkpoint, "--config", body.config, *root, *tail],
                        job_argv=["eval", "--checkpoint", self._local(body.checkpoint), "--config", "benchmarks.yaml",
                                  *job_root, *tail],
                        files={"benchmarks.yaml": body.config})

    # -------------------------------------------------------------------------------- decisions

    def _outputs_present(self, kind: str, result: dict[str, Any]) -> str | None:
        """None when what the record says the step made is still there; else what is missing."""
        from jobs.outcome import checkpoint_id, dataset_version

        if kind == "convert":
            dataset = result.get("dataset", "")
            if not dataset or dataset_version(dataset) != result.get("version"):
                return f"dataset {dataset} is gone or holds another version"
        if kind == "train":
            ckpt = result.get("checkpoint") or ""
            if not ckpt or checkpoint_id(ckpt) != result.get("checkpoint_id"):
                return f"checkpoint {ckpt or '(none)'} is gone or changed"
        return None

    def decide(self, name: str, prepared: Prepared) -> tuple[str, str, dict[str, Any] | None]:
        """(run|skip, why, the record of this key if any)."""
        kind = self.workflow.steps[name].kind
        record = self.store.read(name, prepared.key)
        if record is not None:
            if record.get("status") == "succeeded":
                missing = self._outputs_present(kind, record.get("result") or {})
                if missing is None:
                    ran = record.get("finished", "?")
                    run = f", MLflow run {record['run_id']}" if record.get("run_id") else ""
                    return "skip", f"cached: inputs unchanged since {ran}{run}", record
                return "run", f"inputs unchanged but {missing}", record
            if record.get("status") == "running":
                job = f" (Ray job {record['job_id']})" if record.get("job_id") else ""
                return "run", f"resumes attempt {record.get('attempt', 1)}, which did not finish{job}", record
            return "run", (f"resumes after attempt {record.get('attempt', 1)} failed: "
                           f"{record.get('error', 'unknown error')}"), record
        latest = self.store.latest(name)
        if latest is None:
            return "run", "never ran with these inputs", None
        changed = _changed(latest.get("inputs", {}), prepared.inputs)
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        return "run", f"inputs changed since the last run: {shown}", None

    def _recorded_outputs(self, name: str, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """For a step outside the selection: what its succeeded record for today's inputs made."""
        prepared = self.prepare(name, outputs)
        record = self.store.read(name, prepared.key)
        if not record or record.get("status") != "succeeded":
            raise WorkflowError(f"step {name} has no finished output for its current inputs, and "
                                f"{self.selection_note} leaves it out: run it first (drop {self.selection_note})")
        return _outputs(self.workflow.steps[name].kind, record.get("result") or {})

    def plan(self) -> list[Decision]:
        """What `run` would do now, and why, without running anything."""
        decisions: dict[str, Decision] = {}
        outputs: dict[str, dict[str, Any]] = {}
        for name in self.order:
            waiting = [d for d in dependencies(self.workflow, name)
                       if d in decisions and decisions[d].action == "run"]
            if name not in self.selected:
                decisions[name] = Decision(name, "skip", f"not selected ({self.selection_note})")
                try:
                    outputs[name] = self._recorded_outputs(name, outputs)
                except WorkflowError:
                    pass
                continue
            if waiting:
                verb = "runs" if len(waiting) == 1 else "run"
                decisions[name] = Decision(name, "run", f"after {', '.join(waiting)}, which {verb} first")
                continue
            try:
                prepared = self.prepare(name, outputs)
            except WorkflowError as err:
                decisions[name] = Decision(name, "run", f"cannot tell yet: {err}")
                continue
            action, reason, record = self.decide(name, prepared)
            decisions[name] = Decision(name, action, reason, prepared.key, shlex.join(["xsam", *prepared.argv]))
            if action == "skip":
                outputs[name] = _outputs(self.workflow.steps[name].kind, (record or {}).get("result") or {})
        return [decisions[n] for n in self.order]

    # ------------------------------------------------------------------------------------- run

    def run(self) -> list[Outcome]:
        from jobs.submit import init_ray

        decisions = self.plan() if self.tracking else []
        if any(d.action == "run" for d in decisions):
            self._start_parent_run(decisions)
        elif self.tracking:
            state = self.store.workflow_state() or {}
            self.console.print(f"nothing to run: every step is cached (the last workflow run: MLflow run "
                               f"{state.get('run_id', '?')})", soft_wrap=True)
        started_ray = False
        if not self.jobs_api:
            started_ray = init_ray(self.address, num_cpus=os.cpu_count() or 1)
        # every step's MLflow run goes into the workflow's experiment, next to the parent run
        experiment, os.environ["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME"), self._experiment()
        outcomes: dict[str, Outcome] = {}
        outputs: dict[str, dict[str, Any]] = {}
        try:
            self._walk(outcomes, outputs)
        finally:
            if experiment is None:
                os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
            else:
                os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
            if started_ray:
                import ray

                ray.shutdown()
            self._finish_parent_run(outcomes)
        return [outcomes[n] for n in self.order]

    def _experiment(self) -> str:
        return os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.workflow.experiment_name

    def _walk(self, outcomes: dict[str, Outcome], outputs: dict[str, dict[str, Any]]) -> None:
        pending = list(self.order)
        running: dict[concurrent.futures.Future, str] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_parallel) as pool:
            while pending or running:
                for name in list(pending):
                    deps = dependencies(self.workflow, name)
                    if any(d not in outcomes for d in deps):
                        continue
                    bad = [d for d in deps if outcomes[d].status in ("failed", "blocked")]
                    pending.remove(name)
                    if bad:
                        outcomes[name] = Outcome(name, "blocked", f"{', '.join(bad)} did not finish")
                        self.console.print(f"[yellow]- {name}[/]: not run, {', '.join(bad)} did not finish")
                        continue
                    if name not in self.selected:
                        try:
                            outputs[name] = self._recorded_outputs(name, outputs)
                            outcomes[name] = Outcome(name, "not-selected", f"not selected ({self.selection_note})",
                                                     outputs=outputs[name])
                        except WorkflowError as err:
                            outcomes[name] = Outcome(name, "failed", str(err))
                            self.console.print(f"[red]x {name}[/]: {err}")
                        continue
                    if len(running) >= self.max_parallel:
                        pending.insert(0, name)
                        break
                    running[pool.submit(self._step, name, dict(outputs))] = name
                if not running:
                    continue
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    name = running.pop(future)
                    outcome = future.result()
                    outcomes[name] = outcome
                    if outcome.status in ("ran", "skipped"):
                        outputs[name] = outcome.outputs

    def _step(self, name: str, outputs: dict[str, dict[str, Any]]) -> Outcome:
        kind = self.workflow.steps[name].kind
        begin = time.monotonic()
        try:
            prepared = self.prepare(name, outputs)
            action, reason, record = self.decide(name, prepared)
        except Exception as err:  # WorkflowError, or storage that cannot be read
            message = str(err) if isinstance(err, WorkflowError) else f"{type(err).__name__}: {err}"
            self.console.print(f"[red]x {name}[/]: {message}", soft_wrap=True)
            return Outcome(name, "failed", message)
        if action == "skip":
            result = (record or {}).get("result") or {}
            self.console.print(f"[green]= {name}[/] ({kind}): skipped, {reason}", soft_wrap=True)
            return Outcome(name, "skipped", reason, prepared.key, _outputs(kind, result), record.get("run_id"))
        self.console.print(f"[bold cyan]> {name}[/] ({kind}): {reason}", soft_wrap=True)
        self.console.print(f"  {shlex.join(['xsam', *prepared.argv])}", soft_wrap=True, markup=False,
                           highlight=False)
        try:
            result, run_id = self._execute(name, kind, prepared, record)
        except Exception as err:  # StepFailed, or the storage / the cluster failing under the driver
            message = str(err) if isinstance(err, StepFailed) else f"{type(err).__name__}: {err}"
            self.console.print(f"[red]x {name}[/] failed: {message}", soft_wrap=True)
            return Outcome(name, "failed", message, prepared.key, seconds=time.monotonic() - begin)
        seconds = time.monotonic() - begin
        self.console.print(f"[green]v {name}[/] ({kind}) done in {seconds:.0f} s", soft_wrap=True)
        return Outcome(name, "ran", reason, prepared.key, _outputs(kind, result), run_id, seconds)

    def _execute(self, name: str, kind: str, prepared: Prepared,
                 previous: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        from jobs.outcome import read_result

        attempt = (previous or {}).get("attempt", 0) + 1
        if self.jobs_api and self._live_job((previous or {}).get("job_id")):
            attempt -= 1  # the earlier attempt's Ray job is still there: followed, not submitted again
        if self.parent_run_id and kind in ("train", "evaluate"):  # they make their own child runs
            prepared.argv += ["--parent-run-id", self.parent_run_id]
            prepared.job_argv += ["--parent-run-id", self.parent_run_id]
        if kind == "evaluate":  # a new folder per attempt (evaluation never overwrites); on the job's node
            # when the storage is remote (the scores and pictures reach MLflow either way)
            folder = f"{self.workflow.name}-{name}-{prepared.key[:12]}-{attempt}"
            local = "://" not in self.storage
            out = f"{self.storage}/eval/{folder}" if local else \
                f"{tempfile.gettempdir()}/xsam-eval/{folder}-{int(time.time())}"
            prepared.argv += ["--out", out]
            prepared.job_argv += ["--out", out]
        record = {"step": name, "kind": kind, "key": prepared.key, "status": "running", "attempt": max(attempt, 1),
                  "inputs": prepared.inputs, "command": ["xsam", *prepared.argv], "started": _now(),
                  "workflow_run_id": self.parent_run_id, "job_id": (previous or {}).get("job_id")}
        self.store.write(name, prepared.key, record)
        child = self._child_run(name, kind, prepared) if kind in ("convert", "lint") else None
        if self.jobs_api:
            code = self._run_job(name, prepared, record)
        else:
            code = run_in_process(prepared.argv)
        result = read_result(self.store.result_uri(name, prepared.key)) if code == 0 else None
        if code != 0 or result is None:
            record.update(status="failed", finished=_now(),
                          error=f"exit code {code}" if code != 0 else "the command wrote no --result-json")
            self.store.write(name, prepared.key, record)
            self._end_child(child, "FAILED", None)
            raise StepFailed(record["error"])
        run_id = result.get("mlflow_run_id") or child
        record.update(status="succeeded", finished=_now(), result=result, run_id=run_id)
        self.store.write(name, prepared.key, record)
        self._end_child(child, "FINISHED", result)
        if run_id and child is None:
            tags = {"xsam.workflow": self.workflow.name, "xsam.workflow.step": name, "xsam.workflow.key": prepared.key}
            if kind == "evaluate":  # named like the stages' runs, not after the checkpoint's folder
                tags["mlflow.runName"] = f"{self.workflow.name}-{name}-{prepared.key[:12]}"
            self._tag_run(run_id, tags)
        return result, run_id

    # --------------------------------------------------------------------------------- Ray Jobs

    def _live_job(self, job_id: str | None) -> Any:
        """The status of an earlier attempt's Ray job when it is running or succeeded, else None."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        if not job_id:
            return None
        try:
            status = JobSubmissionClient(self.address).get_job_status(job_id)
        except Exception:  # unknown to this cluster (a new head): submit again
            return None
        return status if status in (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.SUCCEEDED) else None

    def _run_job(self, name: str, prepared: Prepared, record: dict[str, Any]) -> int:
        from ray.job_submission import JobStatus, JobSubmissionClient

        from jobs.submit import follow_job, forwarded_env

        client = JobSubmissionClient(self.address)
        job_id = record.get("job_id")
        status = self._live_job(job_id)
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            self.console.print(f"  following Ray job {job_id}, still running from an earlier driver")
        elif status == JobStatus.SUCCEEDED:
            self.console.print(f"  Ray job {job_id} finished while no driver was watching")
            return 0
        else:
            job_id = f"xsam-{self.workflow.name}-{name}-{prepared.key[:12]}-{record['attempt']}-{int(time.time())}"
            env = {**forwarded_env(self.console), "MLFLOW_EXPERIMENT_NAME": self._experiment()}
            with tempfile.TemporaryDirectory(prefix="xsam-step-") as folder:
                for file, source in prepared.files.items():
                    text = source[len("text:"):] if source.startswith("text:") else Path(source).read_text()
                    (Path(folder) / file).write_text(text)
                runtime_env = {
                    "working_dir": folder, "env_vars": env,
                    "py_modules": [str(package_dir(p)) for p in PACKAGES],
                    "excludes": ["__pycache__", "*.pyc"],
                }
                client.submit_job(entrypoint=shlex.join(["xsam", *prepared.job_argv]), submission_id=job_id,
                                  runtime_env=runtime_env,
                                  metadata={"xsam.workflow": self.workflow.name, "xsam.step": name,
                                            "xsam.key": prepared.key})
            record["job_id"] = job_id
            self.store.write(name, prepared.key, record)
            self.console.print(f"  submitted Ray job {job_id} to {self.address}")
        final = follow_job(client, job_id, prefix=f"[{name}] ")
        self.console.print(f"  Ray job {job_id}: {final}")
        return 0 if final == JobStatus.SUCCEEDED else 1

    # ----------------------------------------------------------------------------------- MLflow

    def _target(self):
        from jobs.tracking import TrackingTarget

        return TrackingTarget.from_environment(self.workflow.experiment_name)

    def _start_parent_run(self, decisions: list[Decision]) -> None:
        from jobs.tracking import Tracker, start_run

        state = self.store.workflow_state() or {}
        reopen = state.get("run_id") if state.get("status") not in (None, "FINISHED") else None
        target = self._target()
        self.parent_run_id = start_run(target, run_name=self.workflow.name, run_id=reopen, tags={
            "xsam.kind": "workflow", "xsam.workflow": self.workflow.name, "xsam.storage": self.storage,
            "xsam.address": self.address or "embedded"}, on_error=self.console.print)
        if self.parent_run_id is None:
            return
        self.store.set_workflow_state({"run_id": self.parent_run_id, "status": "RUNNING", "started": _now()})
        tracker = Tracker(target, self.parent_run_id)
        tracker.log_text(self.path.read_text(), f"workflow/{self.path.name}")
        tracker.log_text(json.dumps([d.to_dict() for d in decisions], indent=2), "workflow/plan.json")
        tracker.close(timeout=60)
        self.console.print(f"MLflow run {self.parent_run_id} ({target.shown()}, experiment {target.experiment})",
                           soft_wrap=True)

    def _finish_parent_run(self, outcomes: dict[str, Outcome]) -> None:
        if not self.parent_run_id:
            return
        from jobs.tracking import Tracker

        ok = all(o.status in ("ran", "skipped", "not-selected") for o in outcomes.values()) \
            and len(outcomes) == len(self.order)
        tracker = Tracker(self._target(), self.parent_run_id)
        tags = {}
        for o in outcomes.values():
            tags[f"xsam.step.{o.step}"] = o.status
            if o.run_id:
                tags[f"xsam.step.{o.step}.run_id"] = o.run_id
        tracker.set_tags(tags)
        tracker.log_metrics({"steps_ran": sum(o.status == "ran" for o in outcomes.values()),
                             "steps_skipped": sum(o.status == "skipped" for o in outcomes.values()),
                             "steps_failed": sum(o.status in ("failed", "blocked") for o in outcomes.values())}, 0)
        tracker.log_text(json.dumps([o.__dict__ for o in outcomes.values()], indent=2, default=str),
                         "workflow/steps.json")
        status = "FINISHED" if ok else "FAILED"
        tracker.terminate(status)
        tracker.close(timeout=60)
        self.store.set_workflow_state({"run_id": self.parent_run_id, "status": status, "finished": _now()})

    def _child_run(self, name: str, kind: str, prepared: Prepared) -> str | None:
        if not self.parent_run_id:
            return None
        from jobs.tracking import Tracker, flatten, start_run

        target = self._target()
        run_id = start_run(target, run_name=f"{name}", tags={
            "mlflow.parentRunId": self.parent_run_id, "xsam.kind": kind, "xsam.workflow": self.workflow.name,
            "xsam.workflow.step": name, "xsam.workflow.key": prepared.key}, on_error=self.console.print)
        if run_id:
            tracker = Tracker(target, run_id)
            tracker.log_params(flatten({k: v for k, v in prepared.inputs.items() if k != "kind"}))
            tracker.close(timeout=60)
        return run_id

    def _end_child(self, run_id: str | None, status: str, result: dict[str, Any] | None) -> None:
        if not run_id:
            return
        from jobs.tracking import Tracker, dataset_input

        tracker = Tracker(self._target(), run_id)
        if result and result.get("kind") == "convert":
            totals = result.get("totals") or {}
            tracker.log_metrics({k: float(v) for k, v in totals.items() if isinstance(v, (int, float))}, 0)
            tracker.log_inputs([dataset_input(name=result["corpus"], path=result["dataset"], version=result["version"],
                                              context="conversion", profile=totals)])
        if result and result.get("kind") == "lint":
            tracker.log_metrics({"datasets": len(result["datasets"]),
                                 "problems": sum(d["problems"] for d in result["datasets"])}, 0)
        if result:
            tracker.log_text(json.dumps(result, indent=2, sort_keys=True), "result.json")
        tracker.terminate(status)
        tracker.close(timeout=60)

    def _tag_run(self, run_id: str, tags: dict[str, str]) -> None:
        from jobs.tracking import Tracker

        tracker = Tracker(self._target(), run_id)
        tracker.set_tags(tags)
        tracker.close(timeout=60)


def _set_overrides(values: dict[str, Any]) -> list[str]:
    """A train step's `set:` as `xsam train --set KEY=VALUE` items (non-strings as JSON, which YAML reads)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


def _outputs(kind: str, result: dict[str, Any]) -> dict[str, Any]:
    if kind == "convert":
        return {"dataset": result.get("dataset"), "version": result.get("version")}
    if kind == "train":
        return {"checkpoint": result.get("checkpoint"), "run_id": result.get("mlflow_run_id"),
                "checkpoint_id": result.get("checkpoint_id")}
    if kind == "evaluate":
        return {"run_id": result.get("mlflow_run_id"), "scores": result.get("scores")}
    return {}


def run_in_process(argv: list[str], runner: Callable[..., Any] | None = None) -> int:
    """`xsam ARGV` in this process (sharing its Ray); the exit code."""
    import click
    import typer

    from pipelines.cli import app

    command = typer.main.get_command(app)
    try:
        value = command.main(args=list(argv), prog_name="xsam", standalone_mode=False)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except Exception:  # a step's crash fails the step, not the workflow driver
        Console(stderr=True).print_exception(max_frames=20)
        return 1
    return value if isinstance(value, int) else 0
