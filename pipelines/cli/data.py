"""`xsam data ...`: convert corpora into shards and inspect, lint, preview and diff datasets.

Thin wrappers: each verb parses its flags and calls library code in `jobs`/`dataprep`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from dataprep.convert import DEFAULT_SHARD_MAX_BYTES, DEFAULT_SHARD_MAX_SAMPLES, ConvertParams, DiskFullError
from dataprep.converters import CONVERTERS
from dataprep.imagecheck import DEFAULT_MAX_PIXELS
from dataprep.quarantine import InputError
from pipelines.cli import stream as stream_cli
from pipelines.cli.output import err_console, fail, out_console
from xsam.data.storage import open_storage

app = typer.Typer(help="Convert corpora into WebDataset shards; inspect the datasets.", no_args_is_help=True)


app.command("mix")(stream_cli.mix)
app.command("stream")(stream_cli.stream)


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
    replace: bool = typer.Option(False, "--replace", help="--out holds another dataset (other inputs or "
                                 "parameters): delete it and convert, instead of refusing"),
    result_json: Optional[str] = typer.Option(None, "--result-json", help="write what was made (dataset, version, "
                                              "counts) to this JSON file, local or s3:// (workflow steps read it)"),
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
        if replace:
            argv.append("--replace")
        if result_json:
            argv += ["--result-json", result_json]
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
        outcome = run_conversion(corpus, out, inputs, params, num_workers=num_workers, address=address,
                                 console=err_console, replace=replace)
    except (InputError, ValueError) as err:
        fail(str(err))
    except DiskFullError as err:
        fail(str(err), 1)
    if result_json:
        from jobs.outcome import dataset_version, write_result

        write_result(result_json, {
            "kind": "convert", "corpus": corpus, "dataset": open_storage(out).url, "version": dataset_version(out),
            "digest": outcome.meta.get("digest"), "totals": outcome.meta.get("totals"),
            "already_complete": outcome.already_complete, "converted_units": outcome.converted_units,
            "reused_units": outcome.reused_units,
        })


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
    datasets: list[str] = typer.Argument(..., help="dataset folder(s) or s3://bucket/prefix"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Totals, per task/source, per quarantine reason and shard sizes of a dataset.

    With several datasets (a training mixture): one table of all of them with totals, and the
    totals per task; `--json` prints {"datasets": [...], "totals": {...}}.
    """
    from dataprep.info import dataset_info

    if len(datasets) > 1:
        _info_many(datasets, as_json)
        return
    (dataset,) = datasets
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


def _info_many(datasets: list[str], as_json: bool) -> None:
    """`xsam data info A B ...`: the mixture table (one row per dataset, totals) and per task."""
    from dataprep.info import mixture_info

    try:
        report = mixture_info([open_storage(d) for d in datasets])
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    except _storage_errors() as err:
        fail(f"cannot read a dataset: {type(err).__name__}: {err}")
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    table = Table(
        title=f"training mixture: {len(report['datasets'])} datasets", show_header=True, header_style="bold",
        box=box.SIMPLE_HEAD,
    )
    # the dataset's folder name (its corpus when the folder is not named after it): the full paths
    # are in --json; a mixture table must stay readable in an 80-column log
    columns = ("dataset", "task", "samples", "items", "quar.", "shards", "MiB", "version")  # splits: per task
    for column in columns:
        numeric = column in ("samples", "items", "quar.", "shards", "MiB")
        table.add_column(
            column, justify="right" if numeric else "left", overflow="fold", no_wrap=True
        )
    for d in report["datasets"]:
        folder = d["path"].rstrip("/").rsplit("/", 1)[-1]
        name = folder if d["corpus"] in folder else f"{d['corpus']} ({folder})"
        table.add_row(
            name, d["task"],
            *(f"{d[n]:,}" for n in ("samples", "items", "quarantined", "shards")),
            f"{d['bytes'] / 2**20:,.1f}", d["version"][:8],
        )
    t = report["totals"]
    table.add_row(
        f"[bold]total ({t['datasets']})[/]", "",
        *(f"[bold]{t[n]:,}[/]" for n in ("samples", "items", "quarantined", "shards")),
        f"[bold]{t['bytes'] / 2**20:,.1f}[/]", "",
    )
    out_console.print(table)
    per_task = Table(title="per task", show_header=True, header_style="bold")
    for column in ("task", "datasets", "splits", "records", "items"):
        per_task.add_column(column, justify="left" if column in ("task", "splits") else "right")
    for task, cell in t["by_task"].items():
        per_task.add_row(task, f"{cell['datasets']:,}", ", ".join(cell["splits"]), f"{cell['records']:,}", f"{cell['items']:,}")
    out_console.print(per_task)
    if not t["accounting_ok"]:
        out_console.print("[red]records_read != samples + quarantined in at least one dataset[/]")


def _storage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "cannot read that location" (local I/O, S3 credentials/bucket/network)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


@app.command("lint")
def lint(
    datasets: list[str] = typer.Argument(..., help="dataset folder(s) or s3://bucket/prefix"),
    verify: str = typer.Option(
        "full", help="full (default: decode every image and mask) or structural (markers/CRCs/run sums only)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON (one object; a list for several "
                                 "datasets)"),
    result_json: Optional[str] = typer.Option(None, "--result-json", help="write each dataset's version and verdict "
                                              "to this JSON file, local or s3:// (workflow steps read it)"),
) -> None:
    """Re-read every shard and check it against the manifest, the index and dataset.json.

    Exit 0 when everything holds, 1 when any problem was found (each is printed, naming the shard
    and the sample key).
    """
    from dataprep.lint import lint_dataset

    if verify not in ("structural", "full"):
        fail(f"--verify must be 'structural' or 'full', got {verify!r}")
    reports = []
    for dataset in datasets:
        try:
            reports.append(lint_dataset(open_storage(dataset), verify=verify, console=None if as_json else err_console))
        except ValueError as err:
            fail(str(err))
        except _storage_errors() as err:
            fail(f"cannot read {dataset}: {type(err).__name__}: {err}")
    ok = all(r.ok for r in reports)
    if result_json:
        from jobs.outcome import write_result

        write_result(result_json, {"kind": "lint", "ok": ok, "verify": verify, "datasets": [
            {"dataset": d, "version": r.version, "ok": r.ok, "problems": len(r.problems), "samples": r.samples}
            for d, r in zip(datasets, reports)]})
    if as_json:
        docs = [r.to_dict() for r in reports]
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, sort_keys=True))
        raise typer.Exit(0 if ok else 1)
    for report in reports:
        for problem in report.problems:
            out_console.print(problem.render(), markup=False, highlight=False, soft_wrap=True)
        checked = (
            f"{report.shards} shards, {report.samples} samples, {report.items} items, {report.masks} masks "
            f"(images: {report.verify})"
        )
        version = f" version {report.version[:16]}" if report.version else ""
        if report.ok:
            out_console.print(f"[green]ok[/]: {report.path}{version}: {checked}; every check holds", soft_wrap=True)
        else:
            out_console.print(f"[red]{len(report.problems)} problem(s)[/] in {report.path}{version}: {checked}",
                              soft_wrap=True)
    if not ok:
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


@app.command("overlap")
def overlap(
    datasets: list[str] = typer.Argument(..., help="dataset folders or s3://bucket/prefix (one or more)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    png: Optional[Path] = typer.Option(None, "--png", help="write the leak table as a PNG bar chart"),
) -> None:
    """Images shared between datasets, and evaluation images that appear in training datasets.

    Same image = same image sha256, or the same COCO image id when both datasets hold COCO images
    (corpus in a known COCO family, or an explicit `coco_image_id` upstream id). A split whose name
    starts with "train" is training; every other split is evaluation. Exit 0 on success, 2 when a
    dataset cannot be read.
    """
    from dataprep.overlap import OverlapInputError, overlap_report, write_leak_png

    try:
        report = overlap_report([open_storage(d) for d in datasets])
    except (OverlapInputError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    except _storage_errors() as err:
        fail(f"cannot read a dataset: {type(err).__name__}: {err}")
    if png is not None:
        try:
            report["png"] = str(write_leak_png(report, png))
        except OSError as err:
            fail(f"cannot write {png}: {err}")
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    dtable = Table(title="datasets", show_header=True, header_style="bold")
    for column in ("label", "corpus", "splits (records / images)", "coco ids", "path"):
        dtable.add_column(column, overflow="fold")
    for d in report["datasets"]:
        splits = ", ".join(
            f"{s}{' (train)' if c['training'] else ''}: {c['records']:,} / {c['images']:,}" for s, c in d["splits"].items()
        )
        dtable.add_row(d["label"], d["corpus"], splits, "yes" if d["coco_ids"] else "no", d["path"])
    out_console.print(dtable)
    if report["pairs"]:
        ptable = Table(title="shared images per pair", show_header=True, header_style="bold")
        for column in ("a", "b", "by sha256", "by COCO id", "per split (a/b: sha, id)"):
            ptable.add_column(column, justify="right" if column.startswith("by") else "left", overflow="fold")
        for p in report["pairs"]:
            detail = "; ".join(
                f"{c['split_a']}/{c['split_b']}: {c['sha256']}, {c['coco_id'] if p['coco_ids_compared'] else '-'}"
                for c in p["by_split"]
                if c["either"]
            )
            coco = f"{p['coco_id']:,}" if p["coco_id"] is not None else "n/a"
            ptable.add_row(p["a"], p["b"], f"{p['sha256']:,}", coco, detail or "none")
        out_console.print(ptable)
    ltable = Table(title="evaluation images in training datasets (leaks)", show_header=True, header_style="bold")
    for column in ("eval dataset", "eval split", "train dataset", "eval images", "leaked", "%", "by sha256", "by COCO id"):
        text = column in ("eval dataset", "eval split", "train dataset")
        ltable.add_column(column, justify="left" if text else "right", overflow="fold")
    for r in report["leaks"]:
        style = "bold red" if r["leaked"] else ""
        ltable.add_row(
            r["eval"], r["eval_split"], f"{r['train']} ({', '.join(r['train_splits'])})",
            f"{r['eval_images']:,}", f"{r['leaked']:,}", f"{r['percent']:.1f}",
            f"{r['sha256']:,}", "n/a" if r["coco_id"] is None else f"{r['coco_id']:,}",
            style=style,
        )
    if not report["leaks"]:
        out_console.print("no evaluation split with a training split to compare against")
    else:
        out_console.print(ltable)
    if png is not None:
        out_console.print(f"leak chart written to {report['png']}", highlight=False, soft_wrap=True)


@app.command("make-examples")
def make_examples_cmd(
    out: Path = typer.Option(Path("data/examples"), "--out", help="where the derived upstream-format inputs go"),
    corpora: Path = typer.Option(Path("examples/corpora"), "--corpora", help="the real COCO samples they derive from"),
    convert_into: Optional[Path] = typer.Option(
        None, "--convert", help="also convert every example corpus into DIR/<corpus> (one local Ray)"
    ),
    num_workers: Optional[int] = typer.Option(None, help="parallel Ray tasks for --convert"),
) -> None:
    """Derive small inputs in every corpus's exact upstream format from the real COCO samples.

    Example: xsam data make-examples --out data/examples --convert data/quickstart
    """
    from dataprep.examples import corpus_of, make_examples

    try:
        found = make_examples(corpora, out)
    except FileNotFoundError as err:
        fail(str(err))
    import shlex

    for name, inputs in sorted(found.items()):
        argv = ["xsam", "data", "convert", corpus_of(name), "--out", f"OUT/{name}"]
        for key, value in inputs.items():
            argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
        out_console.print(f"{name}: {shlex.join(argv)}", soft_wrap=True, markup=False)
    out_console.print(f"inputs listed in {out / 'examples.json'}")
    if convert_into is None:
        return
    import os

    from jobs.convert import run_conversion

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray on loopback
    import ray

    started = not ray.is_initialized()
    if started:  # one Ray for every conversion
        ray.init(num_cpus=num_workers or os.cpu_count() or 1, include_dashboard=False, configure_logging=False)
    try:
        for name, inputs in sorted(found.items()):
            try:
                run_conversion(corpus_of(name), str(convert_into / name), dict(inputs), ConvertParams(),
                               num_workers=num_workers, console=err_console)
            except (InputError, ValueError) as err:
                fail(f"{name}: {err}")
            except DiskFullError as err:
                fail(f"{name}: {err}", 1)
    finally:
        if started:
            ray.shutdown()
