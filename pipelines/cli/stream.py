"""`xsam data mix` and `xsam data stream`: a mixture's plan, and what one rank would read.

Thin wrappers over `xsam.data.mixture`, `xsam.data.plan` and `xsam.data.loader`; registered on the
`xsam data` app by `pipelines.cli.data`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from pipelines.cli.output import err_console, fail, out_console

_SIZING = {"weight": "weights", "repeat": "repeat: sqrt", "repetitions": "repetitions"}


def _open(mixture: Path):
    from xsam.data.mixture import MixtureError, load_mixture
    from xsam.data.plan import open_sources

    try:
        spec = load_mixture(mixture)
        return spec, open_sources(spec)
    except MixtureError as err:
        fail(str(err))
    except Exception as err:  # unreadable source (S3 auth, permissions): name it
        fail(f"cannot read a source of {mixture}: {type(err).__name__}: {err}")
    raise AssertionError("unreachable")


def mix(
    mixture: Path = typer.Argument(..., help="mixture YAML (seed, batching, sources)"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="plan from the manifests only; without it, also verify every shard's sha256"
    ),
    epoch: int = typer.Option(0, "--epoch", help="the epoch to plan"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="local cache of S3 shards"),
) -> None:
    """Items per source per epoch and each source's expected share of every batch (paths: --json).

    Example: xsam data mix configs/mixture.yaml --dry-run
    """
    from xsam.data.loader import plan_summary
    from xsam.data.shards import ShardCache, ShardError, ShardReader

    spec, sources = _open(mixture)
    try:
        summary = plan_summary(spec, sources, epoch)
    except ValueError as err:
        fail(str(err))
    summary["verified_shards"] = None
    if not dry_run:
        cache = ShardCache(cache_dir)
        total = sum(len(s.shards) for s in sources)
        progress = Progress(TextColumn("[bold]verifying shards[/]"), BarColumn(), MofNCompleteColumn(), console=err_console)
        with progress:
            bar = progress.add_task("verify", total=total)
            for source in sources:
                reader = ShardReader(source, cache, max_open=1)
                try:
                    for k in range(len(source.shards)):
                        reader.shard(k)
                        progress.advance(bar)
                except ShardError as err:
                    fail(str(err), code=1)
                finally:
                    reader.close()
        summary["verified_shards"] = total
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    b = summary["batching"]
    table = Table(
        title=f"{mixture}: epoch {epoch}, sizing by {_SIZING[summary['mode']]}, {b['mode']} batches of {b['global_batch_size']}",
        box=box.SIMPLE_HEAD,
        header_style="bold",
    )
    for column in ("source", "tasks", "items", "epoch items", "passes", "share", "per batch"):
        table.add_column(column, justify="left" if column in ("source", "tasks") else "right", no_wrap=True)
    for row in summary["sources"]:
        table.add_row(
            row["name"], ",".join(row["tasks"]), f"{row['items']:,}", f"{row['epoch_items']:,}",
            f"{row['passes']:.3f}", f"{100 * row['share']:.1f}%",
            f"{row['grouped_batches']:,} batches" if b["mode"] == "source_grouped" else f"{row['per_batch']:.2f}",
        )
    out_console.print(table)
    out_console.print(
        f"epoch {epoch}: {summary['epoch_items']:,} items in {summary['global_batches']:,} global batches;"
        f" {summary['padded']:,} padded, {summary['dropped']:,} dropped (remainder: {b['remainder']})",
        highlight=False,
    )
    if b["mode"] == "source_grouped":
        out_console.print("source_grouped: every global batch holds one source; 'per batch' is that source's batches")
    if summary["verified_shards"] is not None:
        out_console.print(f"[green]verified[/] {summary['verified_shards']:,} shards against their manifests")


def stream(
    mixture: Path = typer.Argument(..., help="mixture YAML (seed, batching, sources)"),
    world_size: int = typer.Option(1, "--world-size", help="data-parallel ranks"),
    rank: int = typer.Option(0, "--rank", help="which rank's stream to print"),
    workers: int = typer.Option(0, "--workers", help="dataloader workers fetching items"),
    epoch: Optional[int] = typer.Option(None, "--epoch", help="start at this epoch (default 0, or --state-in's)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="print N items, crossing epochs (default: rest of the epoch)"),
    state_out: Optional[Path] = typer.Option(None, "--state-out", help="write the loader state to this file ..."),
    after: Optional[int] = typer.Option(None, "--after", help="... after this many items"),
    state_in: Optional[Path] = typer.Option(None, "--state-in", help="start from a state written by --state-out"),
    micro_batch_size: int = typer.Option(1, "--micro-batch-size", help="items per fetched batch"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="local cache of S3 shards"),
) -> None:
    """Print the items rank R would consume, in order, one `source<TAB>key` per line.

    The same mixture and seeds print the same lines on every machine, for any --workers.
    Example: xsam data stream mix.yaml --world-size 4 --rank 3 --limit 100 --state-out s.json --after 50
    """
    from xsam.data.loader import StateError, StreamLoader
    from xsam.data.shards import ShardError

    if (state_out is None) != (after is None):
        fail("--state-out and --after go together: --state-out FILE --after N")
    if after is not None and after < 0 or limit is not None and limit < 0:
        fail("--after and --limit must be >= 0")
    if state_out is not None and micro_batch_size != 1:
        fail("--state-out records the state after single items: use it with --micro-batch-size 1")
    spec, sources = _open(mixture)
    try:
        loader = StreamLoader(
            spec, world_size=world_size, rank=rank, num_workers=workers, micro_batch_size=micro_batch_size,
            cache_dir=cache_dir, sources=sources,
        )
        if state_in is not None:
            try:
                state = json.loads(state_in.read_text())
            except (OSError, json.JSONDecodeError) as err:
                fail(f"cannot read loader state {state_in}: {err}")
            loader.load_state_dict(state)
        if epoch is not None:
            loader.set_epoch(epoch)
    except (ValueError, StateError) as err:
        fail(str(err))
    printed = 0
    start_epoch = loader.epoch
    out = sys.stdout

    def maybe_write_state() -> None:
        if state_out is not None and printed == after:
            state_out.write_text(json.dumps(loader.state_dict(), indent=2, sort_keys=True) + "\n")
            err_console.print(f"state after {printed} items written to {state_out}", highlight=False)

    try:
        maybe_write_state()
        while limit is None or printed < limit:
            if limit is None and loader.epoch != start_epoch:
                break
            if len(loader) == 0 and loader.items_per_epoch() == 0:
                fail(f"epoch {loader.epoch} of {mixture} plans no items (remainder: drop with too few items?)")
            for batch in loader:
                for source, key in batch:
                    out.write(f"{source}\t{key}\n")
                    printed += 1
                    maybe_write_state()
                if limit is not None and printed >= limit:
                    break
    except ShardError as err:
        fail(str(err), code=1)
    except BrokenPipeError:  # `| head`: the reader is gone
        sys.stderr.close()
        return
    out.flush()
    bad = sum(loader.counters.bad.values())
    err_console.print(
        f"rank {rank}/{world_size}: {printed} items, now at epoch {loader.epoch} item {loader.position}"
        + (f"; {bad} bad items replaced" if bad else ""),
        highlight=False,
    )
