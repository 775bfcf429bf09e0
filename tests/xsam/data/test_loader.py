"""The co-training stream over real shards: resume, ranks, uneven shards, S3, corruption, bad items.

Datasets are converted in-process from copies of the real COCO sample (tests/builders.py).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from builders import build_instances, convert_local, read_records
from conftest import CORPORA, run_cli

from dataprep.convert import ConvertParams
from xsam.data.loader import KeysOnly, StateError, StreamLoader
from xsam.data.mixture import MixtureError, parse_mixture
from xsam.data.plan import PlanCache, open_sources
from xsam.data.shards import ShardError


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Two training sources with deliberately uneven shards (7 and 4 records per shard, short last)."""
    root = tmp_path_factory.mktemp("loader")
    out = {}
    for name, n, per_shard in (("a", 60, 7), ("b", 25, 4)):
        inputs = build_instances(CORPORA, root / f"in-{name}", n, sample="rle", split="train2017")
        out[name] = convert_local("coco-instances", root / name, inputs, ConvertParams(shard_max_samples=per_shard))
    return out


def mixture(datasets, *, mode="mixed", g=8, reps=(4, 4), seed=11, buffer=16, **batching):
    return parse_mixture(
        {
            "seed": seed,
            "shuffle_buffer": buffer,
            "batching": {"mode": mode, "global_batch_size": g, **batching},
            "sources": [
                {"name": "a", "path": str(datasets["a"]), "repetitions": reps[0]},
                {"name": "b", "path": str(datasets["b"]), "repetitions": reps[1]},
            ],
        }
    )


def take(loader: StreamLoader, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    while len(out) < n:
        for batch in loader:
            out.extend(batch)
            if len(out) >= n:
                break
    return out[:n]


def test_shards_are_uneven(datasets):
    sources = open_sources(mixture(datasets))
    assert [s.items for s in sources[0].shards] == [7] * 8 + [4]
    assert [s.items for s in sources[1].shards] == [4] * 6 + [1]


@pytest.mark.parametrize(("mode", "by_length"), [("mixed", False), ("source_grouped", True)])
def test_resume_gives_the_next_500_items_on_2_ranks_x_2_workers(datasets, tmp_path, mode, by_length):
    spec = mixture(datasets, mode=mode, group_by_length=by_length)
    for rank in range(2):
        def make():
            return StreamLoader(spec, world_size=2, rank=rank, num_workers=2, cache_dir=tmp_path)

        full = take(make(), 800)  # crosses epochs: 340 items, padded to 43 batches of 8: 172 per rank
        interrupted = make()
        take(interrupted, 300)
        state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
        assert state["epoch"] == 1 and state["position"] == 300 - 172
        resumed = make()
        resumed.load_state_dict(state)
        assert take(resumed, 500) == full[300:800]


def test_resume_inside_a_micro_batch_and_with_other_workers(datasets, tmp_path):
    spec = mixture(datasets)
    full = take(StreamLoader(spec, world_size=2, rank=1, num_workers=0, cache_dir=tmp_path), 200)
    single = StreamLoader(spec, world_size=2, rank=1, num_workers=2, micro_batch_size=1, cache_dir=tmp_path)
    take(single, 57)
    state = single.state_dict()
    assert not state["at_global_batch_boundary"]
    resumed = StreamLoader(spec, world_size=2, rank=1, num_workers=1, micro_batch_size=4, cache_dir=tmp_path)
    resumed.load_state_dict(state)
    first = next(iter(resumed))
    assert len(first) == 3  # the rest of the interrupted micro-batch of 4, then aligned batches
    assert first + take(resumed, 140) == full[57:200]


def test_every_rank_gets_the_same_number_of_batches(datasets, tmp_path):
    spec = mixture(datasets, g=6, reps=(1, 1))  # 85 items: 14 global batches + 1 item, padded
    plan = PlanCache(spec, open_sources(spec)).epoch(0)
    assert (plan.global_batches, plan.stats.padded) == (15, 5)
    per_rank = []
    for rank in range(3):
        loader = StreamLoader(spec, world_size=3, rank=rank, cache_dir=tmp_path)
        batches = list(loader)
        assert [len(b) for b in batches] == [2] * 15
        per_rank.append([k for b in batches for k in b])
    everything = Counter(k for keys in per_rank for k in keys)
    assert len(everything) == 85  # every item of both sources, once, plus 5 repeats
    assert sum(everything.values()) == 90 and sum(v - 1 for v in everything.values()) == 5

    dropped = mixture(datasets, g=6, reps=(1, 1), remainder="drop")
    plan = PlanCache(dropped, open_sources(dropped)).epoch(0)
    assert (plan.global_batches, plan.stats.dropped, plan.stats.padded) == (14, 1, 0)


def test_source_grouped_steps_hold_one_source_on_all_ranks(datasets, tmp_path):
    spec = mixture(datasets, mode="source_grouped", g=4, reps=(1, 1))
    ranks = [list(StreamLoader(spec, world_size=2, rank=r, cache_dir=tmp_path)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 15 + 7  # ceil(60/4) + ceil(25/4): leftovers padded per source
    for b0, b1 in zip(*ranks, strict=True):
        assert len({source for source, _ in b0 + b1}) == 1


def test_restore_on_another_world_size_keeps_the_global_batches(datasets, tmp_path):
    spec = mixture(datasets, g=8)

    def global_batches(world, start_state, steps):
        out = []
        loaders = [StreamLoader(spec, world_size=world, rank=r, cache_dir=tmp_path) for r in range(world)]
        for loader in loaders:
            if start_state is not None:
                loader.load_state_dict(start_state)
        streams = [iter(loader) for loader in loaders]
        for _ in range(steps):
            out.append(sorted(k for s in streams for k in next(s)))
        return out, loaders

    two, loaders = global_batches(2, None, 5)
    state = loaders[0].state_dict()
    assert state["at_global_batch_boundary"] and state["global_step"] == 5
    on_four, _ = global_batches(4, state, 3)
    on_two, _ = global_batches(2, None, 8)
    assert on_four == on_two[5:8]

    inside = StreamLoader(spec, world_size=2, rank=0, micro_batch_size=1, cache_dir=tmp_path)
    take(inside, 3)
    with pytest.raises(StateError, match="inside a global batch"):
        StreamLoader(spec, world_size=4, rank=0, cache_dir=tmp_path).load_state_dict(inside.state_dict())
    with pytest.raises(StateError, match="another mixture"):
        StreamLoader(mixture(datasets, seed=12), cache_dir=tmp_path).load_state_dict(state)
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        StreamLoader(spec, world_size=3, rank=0)


def test_items_of_records_with_several_items(tmp_path):
    """Evaluation splits render several items per record: each is planned once per pass."""
    from dataprep.examples import refer

    inputs = refer.build(CORPORA, tmp_path / "in")["refcoco"]
    root = convert_local("refcoco", tmp_path / "refcoco", inputs, ConvertParams(shard_max_samples=2))
    expected = Counter(
        (s.record.key, i) for s in read_records(root).values() for i in range(len(s.items))
    )
    assert sum(expected.values()) > len({k for k, _ in expected})  # several items per record somewhere
    spec = parse_mixture(
        {"seed": 3, "batching": {"global_batch_size": 1}, "sources": [{"name": "r", "path": str(root), "repetitions": 1}]}
    )
    keys = [k for batch in StreamLoader(spec, cache_dir=tmp_path / "c") for _, k in batch]
    got = Counter((k.split("#")[0], int(k.split("#")[1])) for k in keys)
    assert got == expected


def test_split_filter_selects_items_in_shards_that_straddle_splits(tmp_path):
    from dataprep.examples import refer

    inputs = refer.build(CORPORA, tmp_path / "in")["refcoco"]
    root = convert_local("refcoco", tmp_path / "refcoco", inputs, ConvertParams(shard_max_samples=3))
    samples = read_records(root)
    for splits in (["train"], ["val", "testA"], ["testB"]):
        expected = Counter(
            (key, i) for key, s in samples.items() if s.record.source.split in splits for i in range(len(s.items))
        )
        spec = parse_mixture(
            {"seed": 3, "batching": {"global_batch_size": 1},
             "sources": [{"name": "r", "path": str(root), "repetitions": 1, "splits": splits}]}
        )
        source = open_sources(spec)[0]
        assert any(s.select is not None for s in source.shards) or splits == ["testB"]
        keys = [k for batch in StreamLoader(spec, cache_dir=tmp_path / "c") for _, k in batch]
        assert Counter((k.split("#")[0], int(k.split("#")[1])) for k in keys) == expected
    spec = parse_mixture(
        {"seed": 3, "batching": {"global_batch_size": 1},
         "sources": [{"name": "r", "path": str(root), "repetitions": 1, "splits": ["train2017"]}]}
    )
    with pytest.raises(MixtureError, match="has no items of splits train2017"):
        StreamLoader(spec, sources=open_sources(spec))


@pytest.mark.parametrize("mode", ["mixed", "source_grouped"])
def test_length_grouping_reorders_within_windows_only(datasets, tmp_path, mode):
    from dataprep.examples import refer

    inputs = refer.build(CORPORA, tmp_path / "in")["refcoco"]
    ref = convert_local("refcoco", tmp_path / "refcoco", inputs, ConvertParams(shard_max_samples=3))

    def plan(group: bool):
        spec = parse_mixture(
            {
                "seed": 4,
                "batching": {"mode": mode, "global_batch_size": 4, "group_by_length": group, "length_window": 4},
                "sources": [
                    {"name": "a", "path": str(datasets["a"]), "repetitions": 1},
                    {"name": "r", "path": str(ref), "repetitions": 3},
                ],
            }
        )
        plans = PlanCache(spec, open_sources(spec))
        epoch = plans.epoch(0)
        batches = [epoch.batch(b) for b in range(epoch.global_batches)]
        lens = [
            np.concatenate([plans.item_lengths(int(d), pos[src == d]) for d in np.unique(src)]) for src, pos in batches
        ]
        items = Counter((int(d), int(p)) for src, pos in batches for d, p in zip(src, pos, strict=True))
        return items, sum(int(x.max() - x.min()) for x in lens)

    plain_items, plain_spread = plan(False)
    grouped_items, grouped_spread = plan(True)
    # the same items, only in another order (grouped padding may repeat other items of the tail)
    assert set(grouped_items) == set(plain_items) and grouped_items.total() == plain_items.total()
    if mode == "mixed":
        assert grouped_items == plain_items
    assert grouped_spread < plain_spread


def test_s3_source_matches_the_local_one(datasets, s3_server, bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    for path in sorted(datasets["b"].rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"b/{path.relative_to(datasets['b']).as_posix()}")
    local = mixture(datasets, reps=(1, 1))
    remote = parse_mixture(
        {**local.model_dump(), "sources": [local.sources[0].model_dump(), {**local.sources[1].model_dump(), "path": f"s3://{bucket}/b"}]}
    )
    cache = tmp_path / "cache"
    want = take(StreamLoader(local, num_workers=2, cache_dir=tmp_path / "other"), 85)
    got = take(StreamLoader(remote, num_workers=2, cache_dir=cache, cache_bytes=10 << 20), 85)
    assert got == want
    b = open_sources(remote)[1]
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{s.sha256}.tar" for s in b.shards)

    # a corrupt object on S3 is an error naming the shard, after one re-download
    first = b.shards[0].name
    body = bytearray((datasets["b"] / "shards" / first).read_bytes())
    body[700] ^= 0xFF
    client.put_object(Bucket=bucket, Key=f"b/shards/{first}", Body=bytes(body))
    with pytest.raises(ShardError, match=rf"{first} is corrupt: .*downloaded twice"):
        take(StreamLoader(remote, cache_dir=tmp_path / "fresh"), 85)


def test_corrupt_local_shard_is_an_error_naming_it(datasets, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(datasets["b"], copy)
    shard = sorted((copy / "shards").iterdir())[2]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    spec = parse_mixture(
        {"seed": 1, "batching": {"global_batch_size": 5}, "sources": [{"name": "b", "path": str(copy), "weight": 1}]}
    )
    with pytest.raises(ShardError, match=rf"{shard.name} of source 'b' is corrupt"):
        take(StreamLoader(spec, num_workers=2, cache_dir=tmp_path / "c"), 25)
    shard.unlink()
    with pytest.raises(ShardError, match=rf"{shard.name} of source 'b' is missing"):
        take(StreamLoader(spec, cache_dir=tmp_path / "c"), 25)


class FailingOn(KeysOnly):
    """Builder that rejects some items, as an undecodable image would be."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad

    def build(self, raw):
        if raw.key in self.bad:
            raise ValueError(f"cannot decode {raw.key}")
        return super().build(raw)


def test_bad_items_are_replaced_counted_and_bounded(datasets, tmp_path):
    spec = mixture(datasets, reps=(1, 1))
    clean = take(StreamLoader(spec, cache_dir=tmp_path), 40)
    bad = {clean[3][1], clean[10][1]}
    loader = StreamLoader(spec, builder=FailingOn(bad), num_workers=2, cache_dir=tmp_path)
    got = take(loader, 40)
    assert len(got) == 40 and not bad & {k for _, k in got}
    for i in range(40):  # only the bad slots change, to an item of the same source
        if i in (3, 10):
            assert got[i][0] == clean[i][0] and got[i] != clean[i]
        else:
            assert got[i] == clean[i]
    assert loader.counters.bad == Counter({"ValueError": 2})
    assert loader.metrics()["data/bad/ValueError"] == 2.0
    everything = {k for _, k in take(StreamLoader(spec, cache_dir=tmp_path), 85)}
    with pytest.raises(RuntimeError, match="3 bad items in a row"):
        take(StreamLoader(spec, builder=FailingOn(everything), max_consecutive_bad=3, cache_dir=tmp_path), 10)


def test_metrics_count_passes_per_source(datasets, tmp_path):
    spec = mixture(datasets, reps=(1, 3), g=5)
    loader = StreamLoader(spec, cache_dir=tmp_path)
    take(loader, 10**3)  # several epochs
    m = loader.metrics()
    assert m["data/source_passes/b"] == pytest.approx(3 * m["data/source_passes/a"], rel=0.05)
    assert m["data/items/a"] + m["data/items/b"] == 1000


def test_stream_cli_is_the_same_for_any_workers_and_resumes(datasets, tmp_path):
    spec_file = tmp_path / "mix.yaml"
    spec_file.write_text(
        "seed: 5\nshuffle_buffer: 16\nbatching: {mode: source_grouped, global_batch_size: 4}\nsources:\n"
        f"  - {{name: a, path: {datasets['a']}, weight: 3}}\n  - {{name: b, path: {datasets['b']}, weight: 1}}\n"
    )
    args = ["data", "stream", str(spec_file), "--world-size", "2", "--rank", "1", "--cache-dir", str(tmp_path / "c")]
    plain = run_cli(*args, "--limit", "120").stdout.splitlines()
    assert len(plain) == 120 and all(line.count("\t") == 1 for line in plain)
    with_workers = run_cli(*args, "--workers", "2", "--limit", "120", "--state-out", str(tmp_path / "s.json"), "--after", "50")
    assert with_workers.stdout.splitlines() == plain
    resumed = run_cli(*args, "--workers", "2", "--state-in", str(tmp_path / "s.json"), "--limit", "70")
    assert resumed.stdout.splitlines() == plain[50:]
    epoch = run_cli(*args).stdout.splitlines()  # no limit: the rest of epoch 0
    assert epoch == plain[: len(epoch)] and len(epoch) == 44  # 64 + 21 items: 16 + 6 batches of 4

    bad = run_cli(*args, "--state-in", str(tmp_path / "nothing.json"), check=False)
    assert bad.returncode == 2 and "cannot read loader state" in bad.stderr


def test_mix_cli_prints_the_plan_and_verifies_shards(datasets, tmp_path):
    spec_file = tmp_path / "mix.yaml"
    copy = tmp_path / "b"
    shutil.copytree(datasets["b"], copy)
    spec_file.write_text(
        "seed: 5\noversample_ratio: 0.5\nbatching: {mode: mixed, global_batch_size: 8}\nsources:\n"
        f"  - {{name: a, path: {datasets['a']}, repeat: sqrt}}\n  - {{name: b, path: {copy}, repeat: sqrt}}\n"
    )
    dry = json.loads(run_cli("data", "mix", str(spec_file), "--dry-run", "--json").stdout)
    by_name = {row["name"]: row for row in dry["sources"]}
    # r = max(1, sqrt(0.5 / f)): a (60 of 85) -> 1, b (25 of 85) -> sqrt(0.5 * 85 / 25)
    assert by_name["a"]["epoch_items"] == 60
    assert by_name["b"]["epoch_items"] == int(25 * (0.5 * 85 / 25) ** 0.5)
    assert dry["verified_shards"] is None
    table = run_cli("data", "mix", str(spec_file), "--cache-dir", str(tmp_path / "c"))
    assert "verified 16 shards" in table.stdout
    shard = sorted((copy / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:-512])
    broken = run_cli("data", "mix", str(spec_file), "--cache-dir", str(tmp_path / "c"), check=False)
    assert broken.returncode == 1 and shard.name in broken.stderr and "corrupt" in broken.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text(spec_file.read_text().replace("seed:", "sead:"))
    bad = run_cli("data", "mix", str(typo), "--dry-run", check=False)
    assert bad.returncode == 2 and "sead: unknown key" in bad.stderr
