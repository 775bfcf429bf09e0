"""`xsam runs compare`: evaluation runs of an MLflow experiment as one table of runs x benchmark metrics.

Each evaluation run (`jobs.evaluate`, tag `xsam.kind=evaluation`) logs `<benchmark>/<metric>`; this
module reads them back through the tracking server and lays them out with one row per run and one
column per (benchmark, metric), optionally with X-SAM's published numbers (the `paper` entries of
configs/benchmarks.yaml, from the paper's tables, spec §5) as a reference row, so a run can be read
against the paper at a glance. `--metric` selects columns: a metric name (`cIoU`: every benchmark's
cIoU), a benchmark (`refcoco-val`: all its metrics) or one column (`refcoco-val/cIoU`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.evaluate import DEFAULT_BENCHMARKS, BenchmarkFile

PAPER_ROW = "X-SAM (paper)"


@dataclass(kw_only=True)
class CompareTable:
    columns: list[str]  # "<benchmark>/<metric>"
    rows: list[dict[str, Any]]  # {"run": name, "run_id", "checkpoint", "values": {column: value}}
    experiment: str
    notes: list[str] = field(default_factory=list)

    def header(self) -> list[str]:
        return ["run", "run_id", *self.columns]

    def cells(self) -> list[list[str]]:
        out = []
        for row in self.rows:
            values = [_fmt(row["values"].get(c)) for c in self.columns]
            out.append([row["run"], row["run_id"][:8] if row["run_id"] else "", *values])
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", "run_id", *self.columns])
        for row in self.rows:
            writer.writerow([row["run"], row["run_id"], *(_fmt(row["values"].get(c)) for c in self.columns)])
        return buf.getvalue()

    def to_markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in self.cells()]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.2f}"


def _selected(column: str, wanted: list[str]) -> bool:
    if not wanted:
        return True
    bench, _, metric = column.rpartition("/")
    return any(w in (column, bench, metric) for w in wanted)


def paper_numbers(config: str | Path = DEFAULT_BENCHMARKS) -> dict[str, float]:
    """`<benchmark>/<metric>` -> X-SAM's published value, from the benchmark file's `paper` entries."""
    import yaml

    parsed = BenchmarkFile.model_validate(yaml.safe_load(Path(config).read_text()))
    return {f"{name}/{metric}": value for name, spec in parsed.benchmarks.items() for metric, value in spec.paper.items()}


def compare_runs(client: Any, experiment: str, *, metrics: list[str] | None = None, paper: bool = True,
                 config: str | Path = DEFAULT_BENCHMARKS, max_runs: int = 1000) -> CompareTable:
    """The table of `experiment`'s evaluation runs (newest first), with the paper row when asked."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"no MLflow experiment {experiment!r} (evaluation runs go to xsam-eval unless "
                          "--experiment / MLFLOW_EXPERIMENT_NAME named another)")
    runs = client.search_runs([found.experiment_id], filter_string="tags.`xsam.kind` = 'evaluation'",
                              order_by=["attributes.start_time DESC"], max_results=max_runs)
    wanted = list(metrics or [])
    columns: list[str] = []
    rows = []
    for run in runs:
        values = {k: v for k, v in run.data.metrics.items() if "/" in k and not k.endswith("/failed")
                  and _selected(k, wanted)}
        for k in sorted(values):
            if k not in columns:
                columns.append(k)
        rows.append({"run": run.info.run_name or run.info.run_id, "run_id": run.info.run_id,
                     "checkpoint": run.data.tags.get("xsam.checkpoint", ""), "values": values})
    columns.sort(key=lambda c: (c.rpartition("/")[0], c))
    notes = []
    if paper:
        reference = {k: v for k, v in paper_numbers(config).items() if k in columns}
        if reference:
            rows.append({"run": PAPER_ROW, "run_id": "", "checkpoint": "", "values": reference})
        elif rows:
            notes.append("the paper reports none of these columns")
    if not rows:
        notes.append(f"experiment {experiment!r} has no evaluation runs (tag xsam.kind=evaluation)")
    elif wanted and not columns:
        notes.append(f"no column matches --metric {', '.join(wanted)}")
    return CompareTable(columns=columns, rows=rows, experiment=experiment, notes=notes)
