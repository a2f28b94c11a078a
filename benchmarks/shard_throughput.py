"""Shard write/read throughput against a local S3 endpoint (moto on loopback, started here unless --endpoint).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/shard_throughput.py            # moto server on a free port
    python benchmarks/shard_throughput.py --endpoint http://minio:9000 --bucket bench   # a real store
    python benchmarks/shard_throughput.py --dry-run                    # print the cases, run nothing

Prints a Markdown table: write (ShardWriter.write_shard, fp16 tar + per-shard record), read (read_shards,
verified, into memory) and stream (ShardStream, one process, shuffle buffer 1000) in MB/s of tar bytes and
samples/s. moto is an in-memory emulator: the numbers measure our code path and loopback HTTP, not S3.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from sims_platform.launch.servers import moto_s3

CASES = [  # (name, sample shape, samples per shard, shards)
    ("16x16x1 fp16", (1, 16, 16), 256, 16),
    ("16x16x1 fp16", (1, 16, 16), 4096, 4),
    ("64x64x4 fp16 (latent)", (4, 64, 64), 64, 8),
    ("64x64x4 fp16 (latent)", (4, 64, 64), 512, 4),
]



def run_case(base: str, shape: tuple[int, ...], shard_size: int, shards: int) -> dict[str, float]:
    from sims_platform.data import ShardStream, ShardWriter, read_shards
    from sims_platform.storage.fsio import filesystem

    uri = f"{base}/{uuid.uuid4().hex[:8]}"
    total = shard_size * shards
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(total, *shape, generator=gen)  # made before the clock starts: sampling is not measured
    labels, seeds = torch.arange(total) % 10, torch.arange(total)
    w = ShardWriter(uri, shard_size=shard_size, total=total)
    t0 = time.perf_counter()
    for j in range(shards):
        r = w.shard_range(j)
        w.write_shard(j, x[r.start:r.stop], labels[r.start:r.stop], seeds[r.start:r.stop])
    w.finalize()
    t_write = time.perf_counter() - t0
    fs, path = filesystem(uri)
    nbytes = sum(fs.size(f"{path}/shard-{j:06d}.tar") for j in range(shards))
    t0 = time.perf_counter()
    got = read_shards(uri)
    t_read = time.perf_counter() - t0
    assert len(got[0]) == total
    t0 = time.perf_counter()
    n = sum(1 for _ in ShardStream(uri, seed=0))
    t_stream = time.perf_counter() - t0
    assert n == total
    fs.rm(path, recursive=True)
    mb = nbytes / 1e6
    return {"MB": mb, "samples": total, "write_s": t_write, "read_s": t_read, "stream_s": t_stream}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", help="S3 endpoint URL (default: start a moto server on loopback)")
    p.add_argument("--bucket", default=None, help="bucket to write into (default: a fresh one)")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " " + shlex.join(
        ["python", *sys.argv])
    if a.dry_run:
        for case in CASES:
            print(case)
        return
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        if a.endpoint:  # a real store: credentials come from the environment
            endpoint = a.endpoint
        else:  # moto accepts any credentials
            server = stack.enter_context(moto_s3(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
            endpoint = server.url
            os.environ.update(server.env())
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        import s3fs

        bucket = a.bucket or f"bench-{uuid.uuid4().hex[:8]}"
        fs = s3fs.S3FileSystem()
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        rows = []
        for name, shape, shard_size, shards in CASES:
            r = run_case(f"s3://{bucket}", shape, shard_size, shards)
            rows.append((name, shard_size, r))
            print(f"done: {name}, {shard_size} samples/shard", file=sys.stderr)
    print(f"Command: `{command}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}; endpoint {'moto on loopback' if not a.endpoint else endpoint}\n")
    print("| samples | per shard | shard MB | write MB/s | write samples/s | read MB/s | read samples/s "
          "| stream samples/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, shard_size, r in rows:
        per_shard = r["MB"] / (r["samples"] / shard_size)
        print(f"| {name} | {shard_size} | {per_shard:.2f} | {r['MB'] / r['write_s']:.1f} | "
              f"{r['samples'] / r['write_s']:.0f} | {r['MB'] / r['read_s']:.1f} | {r['samples'] / r['read_s']:.0f} "
              f"| {r['samples'] / r['stream_s']:.0f} |")


if __name__ == "__main__":
    main()
