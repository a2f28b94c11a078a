"""A real S3 endpoint for tests (moto's server on loopback), its fixtures, and a killable shard-writer script."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sims_platform.launch.servers import S3Endpoint, moto_s3

# ----------------------------------------------------------------------------
# The server


def s3_env(endpoint: str) -> dict[str, str]:
    """What s3fs (through botocore) needs to talk to the endpoint; dummy credentials are fine for moto."""
    env = S3Endpoint(endpoint).env()
    del env["AWS_ENDPOINT_URL_S3"]  # tests move AWS_ENDPOINT_URL alone
    return {**env, "AWS_EC2_METADATA_DISABLED": "true", "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------
# Fixtures (import both into a test module to use them)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """One moto server per test module: starting one costs about a second."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint.url


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> Iterator[str]:
    """A fresh bucket on the moto server, with the environment pointing s3fs at it; yields s3://bucket."""
    import s3fs

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # would take precedence over ours
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would keep another test's endpoint/listings
    bucket = f"sims-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


def s3_client():
    """A boto3 client on the endpoint the environment names (to see what S3 itself holds)."""
    import boto3

    return boto3.client("s3")


# ----------------------------------------------------------------------------
# The writer script: python tests/s3_support.py URI ... (what write_samples does, with fake samples)

SHAPE = (4, 64, 64)  # latent-sized: 32 KiB per fp16 sample, so a few hundred make a multipart upload


def fake_samples(seeds: list[int], shape: tuple[int, ...] = SHAPE):
    """Deterministic per-seed data, so a rewritten shard is byte-identical (same checksum)."""
    import torch

    xs = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(xs), torch.tensor([s % 10 for s in seeds]), torch.tensor(seeds)


def _stall(shard: int, nbytes: int, marker: Path) -> None:
    """Make the write of `shard` hang (forever) after nbytes, touching marker: a writer to kill mid-shard."""
    from sims_platform.data import shards

    real = shards.atomic_open

    @contextlib.contextmanager
    def stalling(uri: str, mode: str = "wb"):
        with real(uri, mode) as f:
            if shards.shard_name(shard) not in uri:  # the shard, or its staged copy
                yield f
                return

            class Slow:
                written = 0

                def write(self, b: bytes) -> int:
                    n = f.write(b)  # s3fs uploads a part each time its buffer passes the block size
                    self.written += n
                    if self.written >= nbytes:
                        marker.write_text(uri)
                        time.sleep(3600)
                    return n

            yield Slow()

    shards.atomic_open = stalling


def main() -> None:
    import fsspec

    from sims_platform.data import ShardWriter

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("uri")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--shard-size", type=int, required=True)
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--shape", type=int, nargs="+", default=list(SHAPE))
    p.add_argument("--stall-shard", type=int, help="hang while writing this shard ...")
    p.add_argument("--stall-after", type=int, default=0, help="... after this many of its bytes")
    p.add_argument("--marker", type=Path, help="file written when the writer hangs")
    a = p.parse_args()
    # The smallest part S3 allows, so shards of a few MiB already go up as multipart uploads.
    fsspec.config.conf.setdefault("s3", {})["default_block_size"] = 5 * 2**20
    if a.stall_shard is not None:
        _stall(a.stall_shard, a.stall_after, a.marker)
    w = ShardWriter(a.uri, shard_size=a.shard_size, total=a.total, meta={"writer": "s3_support"})
    for j in [j for j in w.missing_shards() if j % a.parts == a.part]:
        w.write_shard(j, *fake_samples(list(w.shard_range(j)), tuple(a.shape)))
    if not w.missing_shards():
        w.finalize()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script
    main()
