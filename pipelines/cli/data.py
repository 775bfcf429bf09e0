"""`xsam data ...`: convert corpora into shards and inspect, lint, preview and diff datasets.

Thin wrappers: each verb parses its flags and calls library code in `jobs`/`dataprep`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dataprep.convert import DEFAULT_SHARD_MAX_BYTES, DEFAULT_SHARD_MAX_SAMPLES, ConvertParams
from dataprep.converters import CONVERTERS
from dataprep.imagecheck import DEFAULT_MAX_PIXELS
from dataprep.quarantine import InputError
from dataprep.storage import open_storage

app = typer.Typer(help="Convert corpora into WebDataset shards; inspect the datasets.", no_args_is_help=True)
err_console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 2) -> None:
    # soft_wrap: never cut a path in the middle; Text: a path with [brackets] is not markup
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


@app.command("convert")
def convert(
    corpus: str = typer.Argument(..., help="corpus name (see `xsam data list-corpora`)"),
    out: str = typer.Option(..., "--out", help="output folder or s3://bucket/prefix"),
    images: Optional[str] = typer.Option(None, help="images folder or .zip/.tar archive"),
    annotations: Optional[str] = typer.Option(None, help="upstream annotation file"),
    masks: Optional[str] = typer.Option(None, help="mask PNG folder or .zip/.tar archive"),
    root: Optional[str] = typer.Option(None, help="release root folder (e.g. ADEChallengeData2016)"),
    split: Optional[str] = typer.Option(None, help="split name (default: from the input names)"),
    refs: Optional[str] = typer.Option(None, help="REFER refs file: 'refs(unc).p', 'grefs(unc).json'"),
    instances: Optional[str] = typer.Option(None, help="COCO instances.json of a REFER dataset"),
    src: Optional[str] = typer.Option(None, help="a split folder of the upstream release (ReasonSeg)"),
    explanations: Optional[str] = typer.Option(None, help="ReasonSeg explanatory/train.json"),
    flavor: Optional[str] = typer.Option(None, help="which variant of a corpus (e.g. GCG: grandf, refcocog, psg, flickr)"),
    keep_text_only: bool = typer.Option(False, "--keep-text-only", help="keep records without an image (LLaVA)"),
    shard_max_samples: int = typer.Option(DEFAULT_SHARD_MAX_SAMPLES, help="records per shard, at most"),
    shard_max_bytes: int = typer.Option(DEFAULT_SHARD_MAX_BYTES, help="bytes per shard, at most"),
    num_workers: Optional[int] = typer.Option(None, help="parallel Ray tasks (default: CPU count)"),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster: HOST:PORT to drive it, http://HOST:8265 to submit a Ray Job"
    ),
    verify: str = typer.Option("structural", help="image validation: structural (cheap) or full (decode)"),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="reject images declaring more pixels"),
    templates: Optional[Path] = typer.Option(None, help="instruction templates YAML replacing the packaged one"),
) -> None:
    """Convert an upstream corpus into shards (a Ray job; resumable, byte-reproducible).

    Example: xsam data convert coco-panoptic --out data/coco-panoptic --images val2017
    --annotations annotations/panoptic_val2017.json --masks annotations/panoptic_val2017
    """
    if corpus not in CONVERTERS:
        fail(f"unknown corpus {corpus!r}; known: {', '.join(sorted(CONVERTERS))}")
    inputs = {
        "images": images, "annotations": annotations, "masks": masks, "root": root, "split": split,
        "refs": refs, "instances": instances, "src": src, "explanations": explanations, "flavor": flavor,
        "keep_text_only": True if keep_text_only else None,
    }
    if address and address.startswith(("http://", "https://")):
        from jobs.convert import submit_job

        argv = [corpus, "--out", out]
        for name, value in inputs.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not None:
                argv += [flag, str(value)]
        if num_workers is not None:
            argv += ["--num-workers", str(num_workers)]
        if templates is not None:
            argv += ["--templates", str(templates)]
        argv += ["--shard-max-samples", str(shard_max_samples), "--shard-max-bytes", str(shard_max_bytes)]
        argv += ["--verify", verify, "--max-pixels", str(max_pixels)]
        raise typer.Exit(submit_job(address, argv, err_console))

    from jobs.convert import run_conversion

    try:
        params = ConvertParams(
            shard_max_samples=shard_max_samples,
            shard_max_bytes=shard_max_bytes,
            verify=verify,
            max_pixels=max_pixels,
            templates=str(templates) if templates else None,
        )
        run_conversion(corpus, out, inputs, params, num_workers=num_workers, address=address, console=err_console)
    except (InputError, ValueError) as err:
        fail(str(err))


@app.command("list-corpora")
def list_corpora() -> None:
    """List the known corpora with their required and optional inputs."""
    table = Table(show_header=True, header_style="bold")
    table.add_column("corpus")
    table.add_column("task")
    table.add_column("inputs")
    for name, cls in sorted(CONVERTERS.items()):
        lines = [f"--{k.replace('_', '-')}  {v}" for k, v in cls.required_inputs.items()]
        lines += [f"[dim]--{k.replace('_', '-')}  (optional) {v}[/]" for k, v in cls.optional_inputs.items()]
        if cls.example:
            lines.append(f"[dim]e.g. {cls.example}[/]")
        table.add_row(name, cls.task, "\n".join(lines))
    out_console.print(table)


@app.command("info")
def info(
    dataset: str = typer.Argument(..., help="dataset folder or s3://bucket/prefix"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Totals, per task/source, per quarantine reason and shard sizes of a dataset."""
    from dataprep.info import dataset_info

    try:
        summary = dataset_info(open_storage(dataset))
    except FileNotFoundError as err:
        fail(str(err))
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    table = Table(title=f"{summary['corpus']} ({summary['task']}) at {summary['path']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("version", summary["version"][:16])
    table.add_row("schema_version", summary["schema_version"])
    for name in ("records_read", "samples", "items", "quarantined", "quarantined_parts", "shards", "bytes"):
        table.add_row(name, f"{summary[name]:,}")
    sb = summary["shard_bytes"]
    table.add_row("shard bytes min/median/max", f"{sb['min']:,} / {sb['median']:,} / {sb['max']:,}")
    for task, splits in summary["by_task"].items():
        for split_name, cell in splits.items():
            table.add_row(f"{task} / {split_name}", f"{cell['records']:,} records, {cell['items']:,} items")
    for reason, levels in summary["by_reason_level"].items():
        table.add_row(f"quarantine: {reason}", f"{levels['record']:,} records, {levels['part']:,} parts")
    table.add_row("records_read == samples + quarantined", "ok" if summary["accounting_ok"] else "MISMATCH")
    out_console.print(table)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "cannot read that location" (local I/O, S3 credentials/bucket/network)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


@app.command("lint")
def lint(
    dataset: str = typer.Argument(..., help="dataset folder or s3://bucket/prefix"),
    verify: str = typer.Option(
        "full", help="full (default: decode every image and mask) or structural (markers/CRCs/run sums only)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (the report)"),
) -> None:
    """Re-read every shard and check it against the manifest, the index and dataset.json.

    Exit 0 when everything holds, 1 when any problem was found (each is printed, naming the shard
    and the sample key).
    """
    from dataprep.lint import lint_dataset

    if verify not in ("structural", "full"):
        fail(f"--verify must be 'structural' or 'full', got {verify!r}")
    try:
        report = lint_dataset(open_storage(dataset), verify=verify, console=None if as_json else err_console)
    except ValueError as err:
        fail(str(err))
    except _storage_errors() as err:
        fail(f"cannot read {dataset}: {type(err).__name__}: {err}")
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        raise typer.Exit(0 if report.ok else 1)
    for problem in report.problems:
        out_console.print(problem.render(), markup=False, highlight=False, soft_wrap=True)
    checked = (
        f"{report.shards} shards, {report.samples} samples, {report.items} items, {report.masks} masks "
        f"(images: {report.verify})"
    )
    version = f" version {report.version[:16]}" if report.version else ""
    if report.ok:
        out_console.print(f"[green]ok[/]: {report.path}{version}: {checked}; every check holds", soft_wrap=True)
        return
    out_console.print(f"[red]{len(report.problems)} problem(s)[/] in {report.path}{version}: {checked}", soft_wrap=True)
    raise typer.Exit(1)


@app.command("preview")
def preview(
    dataset: str = typer.Argument(..., help="dataset folder or s3://bucket/prefix"),
    png: Path = typer.Option(..., "--png", help="PNG file to write"),
    key: Optional[str] = typer.Option(None, "--key", help="record key"),
    index: Optional[int] = typer.Option(None, "--index", help="N-th record in index.parquet order (from 0)"),
    item: int = typer.Option(0, "--item", help="which item's conversation to show (from 0)"),
) -> None:
    """Draw one record (masks, labels, ignore region, conversation) as a PNG to check it by eye."""
    from dataprep.preview import PreviewError, write_preview

    if (key is None) == (index is None):
        fail("give exactly one of --key KEY or --index N")
    try:
        path, sample = write_preview(open_storage(dataset), png, key=key, index=index, item=item)
    except (FileNotFoundError, PreviewError, ValueError) as err:
        fail(str(err))
    except _storage_errors() as err:
        fail(f"cannot read {dataset} or write {png}: {type(err).__name__}: {err}")
    out_console.print(
        f"preview of {sample.key} (item {item} of {len(sample.items)}, {len(sample.record.segments)} segments) "
        f"written to {path}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("diff")
def diff(
    old: str = typer.Argument(..., help="old dataset folder or s3://bucket/prefix"),
    new: str = typer.Argument(..., help="new dataset folder or s3://bucket/prefix"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (all keys)"),
    max_keys: int = typer.Option(10, "--max-keys", help="keys listed per category in the human output"),
) -> None:
    """Records added, removed, changed and unchanged between two datasets, and their parameter changes."""
    from dataprep.diff import CATEGORIES, DiffInputError, diff_datasets, short

    try:
        report = diff_datasets(open_storage(old), open_storage(new), max_keys=None if as_json else max_keys)
    except (DiffInputError, ValueError) as err:
        fail(str(err))
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    o, n = report["old"], report["new"]
    out_console.print(f"old: {o['path']}  version {o['version'][:16]}  {o['records']:,} records", highlight=False)
    out_console.print(f"new: {n['path']}  version {n['version'][:16]}  {n['records']:,} records", highlight=False)
    if report["same_version"]:
        out_console.print("[green]same version[/]: the manifests are byte-identical")
    table = Table(title="records by task / split", show_header=True, header_style="bold")
    for column in ("task", "split", *CATEGORIES):
        table.add_column(column, justify="left" if column in ("task", "split") else "right")
    for row in report["by_task"]:
        table.add_row(row["task"], row["split"], *(f"{row[c]:,}" for c in CATEGORIES))
    table.add_row("[bold]total[/]", "", *(f"[bold]{report['counts'][c]:,}[/]" for c in CATEGORIES))
    out_console.print(table)
    for category in ("added", "removed", "changed"):
        total = report["counts"][category]
        if not total:
            continue
        out_console.print(f"[bold]{category}[/] ({total:,}):", highlight=False)
        for key in report["keys"][category]:
            what = report["changed_what"].get(key) if category == "changed" else None
            out_console.print(f"  {key}" + (f"  ({', '.join(what)} differs)" if what else ""), highlight=False)
        if total > len(report["keys"][category]):
            out_console.print(f"  ... and {total - len(report['keys'][category]):,} more (--json lists all)")
    changes = [("dataset", d) for d in report["meta"]] + [("parameter", d) for d in report["parameters"]]
    changes += [("input", d) for d in report["inputs"]]
    if changes:
        ptable = Table(title="dataset.json differences", show_header=True, header_style="bold")
        for column in ("kind", "name", "old", "new"):
            ptable.add_column(column, overflow="fold")
        for kind, d in changes:
            ptable.add_row(kind, d["name"], short(d["old"]), short(d["new"]))
        out_console.print(ptable)
    else:
        out_console.print("parameters, inputs and schema version: identical")
