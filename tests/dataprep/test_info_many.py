"""`xsam data info A B ...`: one table of a training mixture, totals, per task; one dataset unchanged.

The datasets are the real COCO panoptic sample (val2017) and a derived copy (the same real image
and panoptic PNG under ids 1..3, split `train2017`, tests/builders.py build_panoptic).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import build_panoptic, panoptic_inputs
from rich.console import Console
from typer.testing import CliRunner

from dataprep.convert import ConvertParams
from dataprep.info import dataset_info, mixture_info
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from pipelines.cli import app

runner = CliRunner()


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"xsam {' '.join(args)} -> {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def two(ray_session, corpora, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("info-many")
    quiet = Console(quiet=True)
    val, train = base / "val", base / "train"
    inputs = {k: str(v) for k, v in panoptic_inputs(corpora / "coco_panoptic").items()}
    run_conversion("coco-panoptic", str(val), inputs, ConvertParams(), num_workers=1, console=quiet)
    copy = {k: str(v) for k, v in build_panoptic(corpora, base / "in", 3).items()}
    run_conversion("coco-panoptic", str(train), {**copy, "split": "train2017"},
                   ConvertParams(shard_max_samples=2), num_workers=1, console=quiet)
    return val, train


def test_single_dataset_json_unchanged(two):
    val, _ = two
    out = cli("data", "info", str(val), "--json")
    assert out == json.dumps(dataset_info(open_storage(val)), indent=2, sort_keys=True) + "\n"
    assert "datasets" not in json.loads(out)
    human = cli("data", "info", str(val))
    assert "records_read == samples + quarantined" in human and "training mixture" not in human


def test_two_datasets_listed_and_summed(two):
    val, train = two
    report = json.loads(cli("data", "info", str(val), str(train), "--json"))
    assert set(report) == {"datasets", "totals"}
    a, b = report["datasets"]
    assert a == dataset_info(open_storage(val)) and b == dataset_info(open_storage(train))
    assert (a["splits"], b["splits"]) == (["val2017"], ["train2017"])
    t = report["totals"]
    assert (t["datasets"], t["samples"], t["items"], t["shards"]) == (2, 4, 4, 1 + 2)
    for name in ("records_read", "quarantined", "quarantined_parts", "bytes"):
        assert t[name] == a[name] + b[name], name
    assert t["by_task"] == {"genseg": {"datasets": 2, "records": 4, "items": 4, "splits": ["train2017", "val2017"]}}
    assert t["accounting_ok"] is True
    assert report == mixture_info([open_storage(val), open_storage(train)])
    human = cli("data", "info", str(val), str(train))
    assert "training mixture: 2 datasets" in human and "per task" in human and "total" in human
    assert "train2017" in human and "val2017" in human


def test_missing_dataset_exits_2(two, tmp_path):
    cli("data", "info", str(two[0]), str(tmp_path / "nope"), code=2)
