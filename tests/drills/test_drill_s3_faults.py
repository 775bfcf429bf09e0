"""Fault drill: an S3-compatible server that throttles, fails, stalls and cuts answers for a while.

A faulty proxy on loopback (`s3proxy.FaultyS3Proxy`) sits between the clients and the session's moto
server; clients reach it through `AWS_ENDPOINT_URL_S3`, as they would reach S3. The promises:
- a conversion writing to s3:// through the faults completes, and its objects are byte-identical to
  a local conversion of the same inputs (no temporary keys left);
- reading a dataset from s3:// (the record reader and `xsam data stream`, i.e. the training loader)
  through 503s, 500s, latency, stalls, downloads cut mid-body and a corrupted download yields every
  record exactly once with the bytes of the local copy;
- a shard the manifest lists but the bucket lacks is a loud `ShardError` naming its URI and the fix,
  asked for once or twice (a 404 is not retried), never a skip or a hang.
The proxy counts what it injected, so each drill also proves that its faults happened and that every
faulted request was asked again until it was answered.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from builders import build_panoptic, convert_local, dataset_files
from conftest import invoke_cli
from s3proxy import FaultyS3Proxy

from dataprep.convert import ConvertParams
from xsam.data.shards import ShardCache, ShardError, read_records

PARAMS = ConvertParams(shard_max_samples=5)  # 12 records -> 3 shards


@pytest.fixture(scope="module")
def drill_inputs(corpora, tmp_path_factory) -> dict[str, Path]:
    """12 copies of the real COCO panoptic sample."""
    return build_panoptic(corpora, tmp_path_factory.mktemp("s3-drill") / "coco", 12)


@pytest.fixture(scope="module")
def local_dataset(drill_inputs, tmp_path_factory) -> Path:
    """The uninterrupted reference: the same inputs converted into a local folder."""
    return convert_local("coco-panoptic", tmp_path_factory.mktemp("s3-drill-local") / "coco-panoptic", drill_inputs,
                         PARAMS)


def _direct(s3_server: str):
    """A client of the S3 server itself (not through the proxy). It stores no transfer checksums
    with what it uploads, so that only the manifest's sha256 can tell a damaged download."""
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3_server, config=Config(request_checksum_calculation="when_required"))


def _objects(s3_server: str, bucket: str, prefix: str) -> dict[str, bytes]:
    client = _direct(s3_server)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read()
            for k in keys if not k[len(prefix) + 1:].startswith("logs/")}


def _upload(s3_server: str, folder: Path, bucket: str, prefix: str) -> str:
    client = _direct(s3_server)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def _assert_faults_ridden_out(proxy: FaultyS3Proxy, expected: dict[str, int]) -> None:
    fired = proxy.fired()
    for kind, least in expected.items():
        assert fired[kind] >= least, f"fault {kind} fired {fired[kind]} times, expected >= {least}: {fired}"
    assert not proxy.unanswered_faults(), proxy.unanswered_faults()


def test_conversion_to_s3_completes_through_errors_and_slow_answers(s3_server, bucket, drill_inputs, local_dataset,
                                                                    monkeypatch) -> None:
    """503 SlowDown on every request for a while, then scattered 500s, dropped connections and slow
    answers: the conversion completes and its objects equal the local conversion's bytes."""
    with FaultyS3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        proxy.inject("slowdown", seconds=0.5)  # throttled: everything refused for half a second
        proxy.inject("internal", count=4, every=4)
        proxy.inject("reset", count=3, every=5, method="PUT")  # uploads whose connection drops
        proxy.inject("latency", count=6, every=3, delay=0.2)
        convert_local("coco-panoptic", f"s3://{bucket}/converted", drill_inputs, PARAMS)  # type: ignore[arg-type]
        _assert_faults_ridden_out(proxy, {"slowdown": 1, "internal": 4, "reset": 3, "latency": 6})
        assert len(proxy.requests) > 20
    assert _objects(s3_server, bucket, "converted") == dataset_files(local_dataset)


def _plan_read_faults(proxy: FaultyS3Proxy) -> None:
    shard = r"/shards/[^/]+\.tar$"
    proxy.inject("internal", count=1, method="GET", path=r"/manifest\.parquet$")
    proxy.inject("slowdown", count=2, method="GET", path=shard)
    proxy.inject("cut", count=3, every=2, method="GET", path=shard)  # downloads dropped mid-body
    proxy.inject("corrupt", count=1, method="GET", path=shard)  # a byte flipped in transit
    proxy.inject("stall", count=1, method="GET", path=shard, delay=0.3)
    proxy.inject("latency", count=3, every=2, delay=0.1)


def _stored(records) -> list[tuple]:
    return [(r.shard, r.record.key, r.record.model_dump_json(), [i.model_dump_json() for i in r.items], r.image)
            for r in records]


def test_reading_shards_from_s3_through_faults_reads_every_record_once(s3_server, bucket, local_dataset,
                                                                       monkeypatch, tmp_path, caplog) -> None:
    """The record reader, then the training loader (`xsam data stream`), each with an empty shard
    cache, through errors, latency, cut and corrupted downloads: every record once, the local bytes."""
    url = _upload(s3_server, local_dataset, bucket, "dataset")
    expected = _stored(read_records(local_dataset, images=True, cache=ShardCache(tmp_path / "local-cache")))
    assert len(expected) == 12 and len({e[1] for e in expected}) == 12
    with FaultyS3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        _plan_read_faults(proxy)
        with caplog.at_level(logging.WARNING):
            got = _stored(read_records(url, images=True, cache=ShardCache(tmp_path / "cache-1")))
        assert got == expected
        _assert_faults_ridden_out(proxy, {"internal": 1, "slowdown": 2, "cut": 3, "corrupt": 1, "stall": 1})
        assert "asking for the rest" in caplog.text  # cut downloads resumed ...
        assert "is corrupt: sha256" in caplog.text and "downloading it again" in caplog.text  # ... a damaged one caught

        mixture = {"seed": 3, "batching": {"mode": "source_grouped", "global_batch_size": 2, "remainder": "drop"},
                   "sources": [{"name": "pan", "path": str(local_dataset), "repetitions": 1}]}
        (tmp_path / "local.yaml").write_text(yaml.safe_dump(mixture))
        mixture["sources"][0]["path"] = url
        (tmp_path / "s3.yaml").write_text(yaml.safe_dump(mixture))
        local = invoke_cli("data", "stream", str(tmp_path / "local.yaml"), "--cache-dir", str(tmp_path / "c0"))
        before = len(proxy.requests)
        proxy.clear()
        _plan_read_faults(proxy)
        remote = invoke_cli("data", "stream", str(tmp_path / "s3.yaml"), "--cache-dir", str(tmp_path / "cache-2"))
        assert remote.stdout == local.stdout
        keys = [line.split("\t")[1].partition("#")[0] for line in remote.stdout.splitlines()]
        assert sorted(keys) == sorted(e[1] for e in expected)  # each record exactly once
        fired = [r.fault for r in proxy.requests[before:] if r.fault]
        assert {"slowdown", "cut", "corrupt"} <= set(fired), fired
        assert not proxy.unanswered_faults()


def test_a_shard_missing_from_the_bucket_fails_loudly_naming_it(s3_server, bucket, local_dataset, monkeypatch,
                                                                tmp_path) -> None:
    """A shard deleted after conversion: the reader and `xsam data stream` stop with an error naming
    the shard's URI and the fix (after one throttled try: the 404 itself is not retried)."""
    url = _upload(s3_server, local_dataset, bucket, "dataset")
    shards = sorted(p.name for p in (local_dataset / "shards").iterdir())
    gone = shards[1]
    _direct(s3_server).delete_object(Bucket=bucket, Key=f"dataset/shards/{gone}")
    where = f"{url}/shards/{gone}"
    with FaultyS3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        proxy.inject("slowdown", count=1, method="GET", path=f"/shards/{gone}$")
        with pytest.raises(ShardError) as info:
            for _ in read_records(url, cache=ShardCache(tmp_path / "cache")):
                pass
        message = str(info.value)
        assert where in message and "missing" in message and "re-run its conversion" in message
        asked = [r for r in proxy.requests if r.path.endswith(f"/shards/{gone}")]
        assert [(r.fault, r.status) for r in asked] == [("slowdown", 503), (None, 404)]

        mixture = {"seed": 3, "batching": {"mode": "source_grouped", "global_batch_size": 2, "remainder": "drop"},
                   "sources": [{"name": "pan", "path": url, "repetitions": 1}]}
        (tmp_path / "s3.yaml").write_text(yaml.safe_dump(mixture))
        proc = invoke_cli("data", "stream", str(tmp_path / "s3.yaml"), "--cache-dir", str(tmp_path / "c2"), check=False)
        assert proc.returncode == 1
        assert where in proc.stderr + proc.stdout and "re-run its conversion" in proc.stderr + proc.stdout


def test_a_shard_damaged_on_every_download_fails_loudly_naming_it(s3_server, bucket, local_dataset, monkeypatch,
                                                                 tmp_path) -> None:
    """Every download of one shard arrives with a byte flipped: its manifest sha256 catches it, it is
    downloaded once more, then the reader stops naming the shard, both hashes and the fix."""
    url = _upload(s3_server, local_dataset, bucket, "dataset")
    with FaultyS3Proxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        proxy.inject("corrupt", count=2, method="GET", path=r"/shards/shard-000000-00\.tar$")
        with pytest.raises(ShardError, match=r"is corrupt: sha256 .* \(downloaded twice\)\. Re-upload") as info:
            for _ in read_records(url, cache=ShardCache(tmp_path / "cache")):
                pass
        assert f"{url}/shards/shard-000000-00.tar" in str(info.value)
        assert proxy.fired() == {"corrupt": 2}
    assert not list((tmp_path / "cache").glob("*.tar"))  # nothing damaged kept in the cache


@pytest.mark.slow
def test_conversion_job_with_ray_writes_to_s3_through_faults(s3_server, bucket, drill_inputs, local_dataset,
                                                             tmp_path) -> None:
    """The whole `xsam data convert` command (its own embedded Ray, 2 workers writing shards) through
    the faulty proxy: completes, and its objects equal the local conversion's bytes."""
    with FaultyS3Proxy(s3_server) as proxy:
        proxy.inject("slowdown", seconds=1.0)
        proxy.inject("internal", count=6, every=3)
        proxy.inject("reset", count=4, every=4, method="PUT")
        proxy.inject("latency", count=10, every=2, delay=0.2)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
        args = ["data", "convert", "coco-panoptic", "--out", f"s3://{bucket}/job",
                *(a for name, path in drill_inputs.items() for a in (f"--{name}", str(path))),
                "--shard-max-samples", str(PARAMS.shard_max_samples), "--num-workers", "2"]
        # its own session: the embedded Ray's processes go with it if the command has to be stopped
        proc = subprocess.Popen([str(Path(sys.executable).parent / "xsam"), *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 0, out
        _assert_faults_ridden_out(proxy, {"slowdown": 1, "internal": 6, "reset": 4, "latency": 10})
    assert _objects(s3_server, bucket, "job") == dataset_files(local_dataset)
