"""Mixture spec: validation, per-epoch item counts, and the proportions the planner delivers."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from xsam.data.loader import mixed_source_counts
from xsam.data.mixture import MixtureError, epoch_counts, load_mixture, parse_mixture
from xsam.data.plan import ShardInfo, SourceInfo

BASE = {"seed": 7, "batching": {"mode": "mixed", "global_batch_size": 8}}


def spec_of(sources, **extra):
    return parse_mixture({**BASE, **extra, "sources": sources})


def synthetic_sources(spec, shard_items: dict[str, list[int]]) -> list[SourceInfo]:
    """Sources described by manifests only (the planner never reads a shard)."""
    out = []
    for s in spec.sources:
        shards = tuple(
            ShardInfo(name=f"{s.name}-{i:06d}.tar", sha256="0" * 64, bytes=1, samples=n, items=n, total_items=n)
            for i, n in enumerate(shard_items[s.name])
        )
        out.append(SourceInfo(spec=s, version=f"v-{s.name}", meta={"by_task": {"genseg": {}}}, shards=shards))
    return out


def test_the_issue_example_loads(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(
        "seed: 1234\n"
        "oversample_ratio: 0.1\n"
        "batching: {mode: mixed, global_batch_size: 8}\n"
        "sources:\n"
        "  - {name: coco, path: data/coco-panoptic, weight: 2.0}\n"
        "  - {name: refcoco, path: s3://bucket/refcoco, weight: 1}\n"
    )
    spec = load_mixture(path)
    assert spec.mix_mode == "weight"
    assert spec.sources[1].path == "s3://bucket/refcoco"
    assert spec.sources[0].path.endswith("/data/coco-panoptic") and spec.sources[0].path.startswith("/")


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({**BASE, "sources": [{"name": "a", "path": "x", "weight": 1, "repeat": "sqrt"}]}, "exactly one of"),
        ({**BASE, "sources": [{"name": "a", "path": "x"}]}, "exactly one of"),
        (
            {**BASE, "sources": [{"name": "a", "path": "x", "weight": 1}, {"name": "b", "path": "y", "repeat": "sqrt"}]},
            "mixes them",
        ),
        ({**BASE, "sources": [{"name": "a", "path": "x", "wieght": 1}]}, "sources.0.wieght: unknown key"),
        ({**BASE, "shuffle": 3, "sources": [{"name": "a", "path": "x", "weight": 1}]}, "shuffle: unknown key"),
        ({**BASE, "sources": [{"name": "a", "path": "x", "weight": 1}, {"name": "a", "path": "y", "weight": 1}]}, "unique"),
        ({**BASE, "sources": [{"name": "a", "path": "x", "repeat": "log"}]}, "sources.0.repeat"),
        ({"seed": 1, "batching": {"mode": "zigzag", "global_batch_size": 8}, "sources": []}, "batching.mode"),
        ({**BASE, "epoch_items": 10, "sources": [{"name": "a", "path": "x", "repetitions": 1}]}, "epoch_items"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_mixtures_are_rejected_with_the_key(doc, needle):
    with pytest.raises(MixtureError) as err:
        parse_mixture(doc, source="m.yaml")
    assert needle in str(err.value) and "m.yaml" in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: [1\n")
    with pytest.raises(MixtureError, match="broken.yaml: not valid YAML"):
        load_mixture(path)
    with pytest.raises(MixtureError, match="cannot read mixture file"):
        load_mixture(tmp_path / "missing.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['touch pwned']\nsources: []\n")
    with pytest.raises(MixtureError, match="not valid YAML"):
        load_mixture(path)


def test_sqrt_repeat_follows_xsam():
    spec = spec_of([{"name": n, "path": n, "repeat": "sqrt"} for n in ("big", "mid", "small")], oversample_ratio=0.1)
    sizes = {"big": 100_000, "mid": 9_000, "small": 1_000}
    total = sum(sizes.values())
    expected = {}
    for name, n in sizes.items():  # r = max(1, sqrt(t / f)), L = int(N * r): spec section 2.3
        f = n / total
        expected[name] = int(n * max(1.0, math.sqrt(0.1 / f)))
    assert epoch_counts(spec, sizes) == expected
    assert expected["big"] == 100_000  # never down-samples
    assert expected["small"] == int(1000 * math.sqrt(0.1 / (1000 / 110_000)))


def test_weights_split_the_epoch_exactly():
    spec = spec_of([{"name": "a", "path": "a", "weight": 2}, {"name": "b", "path": "b", "weight": 1}], epoch_items=1000)
    assert epoch_counts(spec, {"a": 10, "b": 5000}) == {"a": 667, "b": 333}
    spec = spec_of([{"name": "a", "path": "a", "weight": 1}, {"name": "b", "path": "b", "weight": 1}])
    assert epoch_counts(spec, {"a": 3, "b": 4}) == {"a": 4, "b": 3}  # default: sum of items, 7


def test_empty_source_is_an_error():
    spec = spec_of([{"name": "a", "path": "a", "weight": 1}])
    with pytest.raises(MixtureError, match="has no items"):
        epoch_counts(spec, {"a": 0})


@pytest.mark.parametrize("mode", ["mixed", "source_grouped"])
def test_weight_proportions_over_10k_items(mode):
    spec = spec_of(
        [{"name": "a", "path": "a", "weight": 5}, {"name": "b", "path": "b", "weight": 3}, {"name": "c", "path": "c", "weight": 2}],
        batching={"mode": mode, "global_batch_size": 8},
        epoch_items=20_000,
    )
    sources = synthetic_sources(spec, {"a": [100] * 7, "b": [333, 12, 7], "c": [50] * 100})
    counts = mixed_source_counts(spec, sources, epoch=0, first=10_000)
    assert sum(counts.values()) == 10_000
    for name, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[name] / 10_000 - share) <= 0.02, (name, counts)


@pytest.mark.parametrize("mode", ["mixed", "source_grouped"])
def test_repetitions_are_exact(mode):
    spec = spec_of(
        [{"name": "a", "path": "a", "repetitions": 2}, {"name": "b", "path": "b", "repetitions": 1}],
        batching={"mode": mode, "global_batch_size": 8, "remainder": "drop" if mode == "mixed" else "pad"},
    )
    sources = synthetic_sources(spec, {"a": [800, 800, 400], "b": [1000, 1000]})  # multiples of 8: no remainder
    counts = mixed_source_counts(spec, sources, epoch=0, first=10**9)
    assert counts == {"a": 4000, "b": 2000}


def test_every_item_once_per_pass():
    from xsam.data.plan import PlanCache

    spec = spec_of([{"name": "a", "path": "a", "repetitions": 3}], shuffle_buffer=37)
    sources = synthetic_sources(spec, {"a": [10, 3, 25, 1, 41]})
    plans = PlanCache(spec, sources)
    order = plans.orders[0]
    for p in range(3):
        refs = [order.locate(p * 80 + q) for q in range(80)]
        assert Counter((r.shard, r.item) for r in refs) == Counter(
            (k, i) for k, n in enumerate([10, 3, 25, 1, 41]) for i in range(n)
        )
        assert {r.pass_ for r in refs} == {p}
    first = [(r.shard, r.item) for r in (order.locate(q) for q in range(80))]
    second = [(r.shard, r.item) for r in (order.locate(80 + q) for q in range(80))]
    assert first != second  # a new order every pass


def test_the_plan_is_pinned():
    """The plan must not change silently: saved loader states and "what did rank 3 see" answers
    depend on it. Computed once by this code (sha256 seeds, numpy PCG64: machine independent);
    a change to the planner that fails this test must also bump loader.STATE_FORMAT."""
    from xsam.data.plan import PlanCache

    spec = spec_of(
        [{"name": "a", "path": "/a", "weight": 2}, {"name": "b", "path": "/b", "weight": 1}],
        seed=2026,
        shuffle_buffer=5,
        batching={"mode": "mixed", "global_batch_size": 4},
    )
    sources = synthetic_sources(spec, {"a": [3, 4, 2], "b": [5, 1]})
    plans = PlanCache(spec, sources)
    got = []
    for b in range(3):
        src, pos = plans.epoch(1).batch(b)
        for d, p in zip(src, pos, strict=True):
            ref = plans.orders[int(d)].locate(int(p))
            got.append((int(d), ref.shard, ref.item, ref.pass_))
    assert got == [
        (1, 0, 4, 0), (0, 1, 2, 1), (0, 1, 0, 1), (0, 1, 3, 1), (1, 0, 1, 1), (0, 1, 1, 1),
        (0, 0, 2, 1), (0, 0, 0, 1), (1, 0, 2, 1), (1, 0, 4, 1), (0, 2, 1, 1), (0, 0, 1, 1),
    ]
