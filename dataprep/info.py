"""`xsam data info`: what a dataset folder holds, from its metadata files only (cheap)."""

from __future__ import annotations

from typing import Any

from xsam.data.manifest import QUARANTINE, load_dataset, read_parquet
from xsam.data.storage import Storage


def dataset_info(storage: Storage) -> dict[str, Any]:
    """Totals, per task/split, per quarantine reason and shard sizes of a complete dataset."""
    files = load_dataset(storage)
    meta = files.meta
    totals = meta["totals"]
    sizes = sorted(row["bytes"] for row in files.manifest)
    samples = [row["samples"] for row in files.manifest]
    quarantine = read_parquet(storage, QUARANTINE)
    by_reason: dict[str, int] = {}
    for row in quarantine:
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + 1
    return {
        "path": storage.url,
        "version": files.version,
        "schema_version": meta["schema_version"],
        "corpus": meta["corpus"],
        "task": meta["task"],
        "converter": meta["converter"],
        "splits": meta["splits"],
        "records_read": totals["records_read"],
        "samples": totals["samples"],
        "items": totals["items"],
        "quarantined": totals["quarantined"],
        "quarantined_parts": totals["quarantined_parts"],
        "shards": len(files.manifest),
        "bytes": totals["bytes"],
        "shard_bytes": {
            "min": sizes[0] if sizes else 0,
            "median": sizes[len(sizes) // 2] if sizes else 0,
            "max": sizes[-1] if sizes else 0,
        },
        "shard_samples": {"min": min(samples, default=0), "max": max(samples, default=0)},
        "by_task": meta["by_task"],
        "by_reason": dict(sorted(by_reason.items())),
        "by_reason_level": meta["by_reason"],
        "parameters": meta["parameters"],
        "inputs": meta["inputs"],
        "accounting_ok": totals["records_read"] == totals["samples"] + totals["quarantined"],
    }


MIXTURE_SUMS = ("records_read", "samples", "items", "quarantined", "quarantined_parts", "shards", "bytes")


def mixture_info(storages: list[Storage]) -> dict[str, Any]:
    """`dataset_info` of each dataset of a training mixture, plus totals over all and per task.

    `totals` holds the sums of MIXTURE_SUMS, the dataset count, and `by_task`:
    {task: {"datasets": n, "records": r, "items": i, "splits": [...]}} summed over every dataset.
    """
    datasets = [dataset_info(s) for s in storages]
    totals: dict[str, Any] = {name: sum(d[name] for d in datasets) for name in MIXTURE_SUMS}
    totals["datasets"] = len(datasets)
    by_task: dict[str, dict[str, Any]] = {}
    for d in datasets:
        for task, splits in d["by_task"].items():
            cell = by_task.setdefault(task, {"datasets": 0, "records": 0, "items": 0, "splits": []})
            cell["datasets"] += 1
            for split_name, counts in splits.items():
                cell["records"] += counts["records"]
                cell["items"] += counts["items"]
                if split_name not in cell["splits"]:
                    cell["splits"].append(split_name)
    for cell in by_task.values():
        cell["splits"].sort()
    totals["by_task"] = dict(sorted(by_task.items()))
    totals["accounting_ok"] = all(d["accounting_ok"] for d in datasets)
    return {"datasets": datasets, "totals": totals}
