"""A shard carrying a pickle (issue 9: WebDataset reading with safe decoding only).

WebDataset's default decoders unpickle `.pyd` / `.pickle` members. Our readers never use them: the
shard reader maps a record's `KEY.json` and `KEY.<jpg|png>` members and reads nothing else. This test
plants, next to each record of a real converted dataset, a `KEY.pyd` and a `KEY.pickle` member whose
unpickling would call `open(MARKER, "w")` (pickled as `io.open`), and updates the manifest to the new shard hash (an
attacker who can write the shards can write the manifest too). Then:

- every reader of the code base that reads shards (`read_records`, the training loader's
  `StreamLoader` over the same dataset, `xsam data preview`) returns every record, with the image
  bytes of the conversion, and the marker file never appears;
- `xsam data lint` reports each planted member by name and fails;
- the payload is live: the restricted unpickler refuses it for naming `io.open`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import build_panoptic, convert_local, read_samples, tar_add
from conftest import CORPORA, invoke_cli

from dataprep.quarantine import InputError
from dataprep.safe_pickle import loads_data_pickle
from xsam.data.manifest import MANIFEST
from xsam.data.shards import read_records


class _OpenOnLoad:
    """Pickles as a call of open(path, "w"): unpickling it creates `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(shard: Path, payload: bytes) -> list[str]:
    """Rewrite `shard` with KEY.pyd and KEY.pickle after each record's members; the planted names."""
    planted: list[str] = []
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        members = src.getmembers()
        for i, info in enumerate(members):
            tar_add(dst, info.name, src.extractfile(info).read())
            key = info.name.partition(".")[0]
            if i + 1 == len(members) or members[i + 1].name.partition(".")[0] != key:
                for ext in ("pickle", "pyd"):
                    tar_add(dst, f"{key}.{ext}", payload)
                    planted.append(f"{key}.{ext}")
    shard.write_bytes(buf.getvalue())
    return planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    out = convert_local("coco-panoptic", root / "out", build_panoptic(CORPORA, root / "coco", 3))
    clean = read_samples(out)
    marker = root / "UNPICKLED"
    payload = pickle.dumps(_OpenOnLoad(marker), protocol=2)
    names: list[str] = []
    table = pq.read_table(out / MANIFEST)
    rows = table.to_pylist()
    for row in rows:
        shard = out / "shards" / row["name"]
        names += _plant(shard, payload)
        data = shard.read_bytes()
        row["sha256"], row["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / MANIFEST)
    return {"out": out, "clean": clean, "marker": marker, "payload": payload, "names": names, "root": root}


def test_the_payload_is_live(planted):
    """The planted bytes name a callable: the restricted unpickler refuses them (nothing runs)."""
    with pytest.raises(InputError, match=r"global io\.open"):
        loads_data_pickle(planted["payload"], name="planted.pyd", option="refs")
    assert not planted["marker"].exists()


def test_readers_read_every_record_and_never_unpickle(planted, tmp_path):
    out, clean = planted["out"], planted["clean"]
    assert len(planted["names"]) == 2 * len(clean) == 6
    records = list(read_records(out, images=True))
    assert sorted(r.record.key for r in records) == sorted(clean)
    for stored in records:
        sample, members = clean[stored.record.key]
        assert stored.image == members[sample.record.image.ext]
        assert stored.record == sample.record
    assert not planted["marker"].exists()

    for i in range(len(clean)):
        proc = invoke_cli("data", "preview", str(out), "--index", str(i), "--png", str(tmp_path / f"{i}.png"),
                          check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (tmp_path / f"{i}.png").stat().st_size > 0
    assert not planted["marker"].exists()


def test_the_training_loader_reads_every_item_and_never_unpickles(planted):
    """The training path: StreamLoader (2 worker processes) with the real XSamBuilder (decode, preprocess,
    tokenise, masks) over one epoch of the planted dataset."""
    from xsam.data.builder import XSamBuilder
    from xsam.data.loader import StreamLoader
    from xsam.data.mixture import parse_mixture
    from xsam.data.transforms import PreprocessConfig
    from xsam.text import build_tiny_tokenizer

    root = planted["root"]
    spec = parse_mixture({"seed": 0, "batching": {"mode": "mixed", "global_batch_size": 1},
                          "sources": [{"name": "coco", "path": str(planted["out"]), "repetitions": 1}]})
    builder = XSamBuilder(micro_batch_size=1, tokenizer=build_tiny_tokenizer(root / "tok"),
                          preprocess=PreprocessConfig(vision_size=32, seg_size=64), seed=0)
    loader = StreamLoader(spec, builder=builder, num_workers=2, cache_dir=root / "cache")
    batches = list(loader)
    assert sum(len(b.masks) for b in batches) == len(planted["clean"]) == 3
    assert all(any(m is not None for m in b.masks) for b in batches)
    assert not planted["marker"].exists()


def test_lint_names_every_planted_member(planted):
    proc = invoke_cli("data", "lint", str(planted["out"]), check=False)
    text = "".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    for name in planted["names"]:
        assert name in text, name
    assert not planted["marker"].exists()
