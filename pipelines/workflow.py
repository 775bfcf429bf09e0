"""The workflow file: typed YAML naming steps, their inputs and what they need.

```yaml
name: quickstart                 # [a-z0-9_-]; names the MLflow parent run and the state folder
storage: xsam-runs               # checkpoints, evaluation outputs, step state (a folder or s3://...)
experiment: xsam-quickstart      # MLflow experiment of the parent run and every step's run
vars: {data: data/quickstart}    # ${data} anywhere in a step; ${name} and ${storage} too
steps:
  convert-refcoco:
    convert: {corpus: refcoco, out: "${data}/refcoco", inputs: {refs: ..., instances: ..., images: ...}}
  stage1:
    train: {recipe: pipelines/recipes/tiny-stage1.yaml, set: {data.root: "${data}"}}
    needs: [convert-refcoco]
  stage2:
    train:
      recipe: pipelines/recipes/tiny-stage2.yaml
      init: [{from: "${steps.stage1.checkpoint}", include: [seg_encoder]}]
  evaluate:
    evaluate: {checkpoint: "${steps.stage2.checkpoint}", benchmarks: [refcoco-val]}
```

Every step is one `xsam` command (`convert` -> `xsam data convert`, `lint` -> `xsam data lint`,
`train` -> `xsam train`, `evaluate` -> `xsam eval`); `commands()` in `pipelines.runner` shows it.
`${steps.STEP.OUTPUT}` is what an earlier step made (convert: `dataset`, `version`; train:
`checkpoint`, `run_id`; evaluate: `run_id`) and makes STEP a dependency; `needs` adds ordering the
references do not imply (a stage that reads a converted dataset through its recipe's data root).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
VAR = re.compile(r"\$\{([^}]*)\}")
OUTPUTS = {"convert": ("dataset", "version"), "lint": (), "train": ("checkpoint", "run_id"),
           "evaluate": ("run_id",)}


class WorkflowError(ValueError):
    """A workflow file that cannot be used; the message names the file, the step and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ConvertStep(_Strict):
    corpus: str = Field(description="a corpus of `xsam data list-corpora`")
    out: str = Field(description="dataset folder or s3://bucket/prefix")
    inputs: dict[str, str | bool] = Field(default_factory=dict, description="the corpus's inputs: images, "
                                          "annotations, masks, refs, instances, src, ..., split, flavor")
    options: dict[str, Any] = Field(default_factory=dict, description="other `xsam data convert` flags, e.g. "
                                    "num-workers: 2, shard-max-samples: 500")


class LintStep(_Strict):
    datasets: list[str] = Field(min_length=1)
    verify: Literal["structural", "full"] = "full"


class InitRef(_Strict):
    from_: str = Field(alias="from")
    include: list[str] = Field(min_length=1)


class TrainStep(_Strict):
    recipe: str = Field(description="recipe YAML, e.g. pipelines/recipes/tiny-stage1.yaml")
    set: dict[str, Any] = Field(default_factory=dict, description="KEY: VALUE over the recipe (`--set`)")
    init: list[InitRef] | None = Field(default=None, description="replaces the recipe's init parents")
    num_workers: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=0, ge=0)


class EvaluateStep(_Strict):
    checkpoint: str
    benchmarks: list[str] = Field(min_length=1)
    config: str = "configs/benchmarks.yaml"
    data_root: str | None = None
    num_actors: int = Field(default=1, ge=1)
    cpus_per_actor: int = Field(default=1, ge=1)


class Step(_Strict):
    needs: list[str] = Field(default_factory=list)
    convert: ConvertStep | None = None
    lint: LintStep | None = None
    train: TrainStep | None = None
    evaluate: EvaluateStep | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        kinds = [k for k in OUTPUTS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a step is exactly one of {', '.join(OUTPUTS)}; this one is "
                             f"{' and '.join(kinds) if kinds else 'none'}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in OUTPUTS if getattr(self, k) is not None)

    @property
    def body(self) -> Any:
        return getattr(self, self.kind)


class Workflow(_Strict):
    name: str
    description: str = ""
    storage: str = Field(default="xsam-runs", description="checkpoints, evaluations and step state")
    experiment: str | None = Field(default=None, description="MLflow experiment (default: the workflow's name)")
    vars: dict[str, str] = Field(default_factory=dict)
    steps: dict[str, Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> Workflow:
        for name in (self.name, *self.steps):
            if not NAME.match(name):
                raise ValueError(f"name {name!r}: use lower-case letters, digits, '-' and '_'")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


# --------------------------------------------------------------------------------------- loading


def _expand(value: Any, variables: dict[str, str], where: str) -> Any:
    """`${var}` in strings replaced; `${steps.*}` kept for run time."""
    if isinstance(value, dict):
        return {k: _expand(v, variables, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, variables, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name = match.group(1).strip()
        if name.startswith("steps."):
            return match.group(0)
        if name not in variables:
            raise WorkflowError(f"{where}: ${{{name}}} is not defined; define it under vars: "
                                f"(known: {', '.join(sorted(variables))})")
        return variables[name]

    return VAR.sub(one, value)


def references(value: Any) -> list[tuple[str, str]]:
    """Every `${steps.STEP.OUTPUT}` in a value, as (STEP, OUTPUT)."""
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    if isinstance(value, BaseModel):
        return references(value.model_dump(mode="json", by_alias=True))
    if not isinstance(value, str):
        return []
    out = []
    for match in VAR.finditer(value):
        parts = match.group(1).strip().split(".")
        if parts[0] == "steps":
            out.append((parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""))
    return out


def substitute(value: Any, outputs: dict[str, dict[str, Any]]) -> Any:
    """`${steps.STEP.OUTPUT}` replaced by what STEP made."""
    if isinstance(value, dict):
        return {k: substitute(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        _, step, output = match.group(1).strip().split(".")
        found = outputs.get(step, {}).get(output)
        if found is None:
            raise WorkflowError(f"${{steps.{step}.{output}}}: step {step} has no {output} (did it run?)")
        return str(found)

    return VAR.sub(one, value)


def load_workflow(path: str | Path) -> Workflow:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"workflow file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise WorkflowError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise WorkflowError(f"{path}: expected a mapping with name, steps (see docs/workflows.md)")
    variables = {str(k): str(v) for k, v in (doc.get("vars") or {}).items()}
    variables.setdefault("name", str(doc.get("name", "")))
    variables.setdefault("storage", str(doc.get("storage", "xsam-runs")))
    doc = {**doc, "steps": _expand(doc.get("steps"), variables, "steps")}
    try:
        workflow = Workflow.model_validate(doc)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise WorkflowError(f"{path} is not a valid workflow:\n" + "\n".join(lines)) from None
    order(workflow)  # unknown needs, bad references and cycles fail here, before anything runs
    return workflow


def dependencies(workflow: Workflow, name: str) -> list[str]:
    """The steps `name` waits for: its `needs` and the steps its `${steps.*}` references name."""
    step = workflow.steps[name]
    out = list(step.needs)
    for ref_step, output in references(step.body):
        if ref_step not in workflow.steps:
            raise WorkflowError(f"step {name}: ${{steps.{ref_step}.{output}}} names no step of the workflow")
        if output not in OUTPUTS[workflow.steps[ref_step].kind]:
            raise WorkflowError(f"step {name}: ${{steps.{ref_step}.{output}}}: a {workflow.steps[ref_step].kind} "
                                f"step makes {', '.join(OUTPUTS[workflow.steps[ref_step].kind]) or 'no output'}")
        out.append(ref_step)
    for need in out:
        if need not in workflow.steps:
            raise WorkflowError(f"step {name} needs {need!r}, which is not a step of the workflow")
        if need == name:
            raise WorkflowError(f"step {name} needs itself")
    return list(dict.fromkeys(out))


def order(workflow: Workflow) -> list[str]:
    """The steps in an order that runs each after what it needs (file order where free)."""
    deps = {name: dependencies(workflow, name) for name in workflow.steps}
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise WorkflowError(f"the steps form a cycle: {' -> '.join(cycle)}")
        visiting.append(name)
        for need in deps[name]:
            visit(need)
        visiting.pop()
        done.append(name)

    for name in workflow.steps:
        visit(name)
    return done


def downstream(workflow: Workflow, start: str) -> list[str]:
    """`start` and every step that depends on it, directly or not, in run order."""
    if start not in workflow.steps:
        raise WorkflowError(f"no step {start!r}; the steps are {', '.join(workflow.steps)}")
    reached = {start}
    for name in order(workflow):
        if any(d in reached for d in dependencies(workflow, name)):
            reached.add(name)
    return [n for n in order(workflow) if n in reached]
