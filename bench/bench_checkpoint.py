"""Benchmark: training stall per checkpoint and upload throughput, against a local moto server.

Compares the training stall of the worker's background upload (CheckpointManager.save) with
two baselines: a plain in-memory copy of the state's tensors, and the synchronous approach
(torch.save to a local file, boto3 upload_file, then continue). It also compares S3Storage's
multipart upload with boto3's upload_file, for one checkpoint of --size-mb megabytes. The
measurements alternate within each repeat, so load from other processes hits all of them alike.
Run: .venv/bin/python bench/bench_checkpoint.py [--size-mb 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import torch

from worker.background import BackgroundLoop
from worker.checkpoint import CheckpointManager
from worker.storage import open_storage

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **CREDENTIALS},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start")


def make_state(size_mb: int) -> dict[str, torch.Tensor]:
    elements = size_mb * 1024 * 1024 // 4
    return {f"layer{i}": torch.randn(elements // 8) for i in range(8)}


def background_stall_s(url: str, bucket: str, state: dict, step: int) -> tuple[float, float]:
    """Return (stall, time until durable) for one CheckpointManager.save."""
    loop = BackgroundLoop()
    storage = open_storage(f"s3://{bucket}/background", endpoint_url=url, path_style=True)
    manager = CheckpointManager(storage, loop, keep=1)
    started = time.perf_counter()
    manager.save(step, state)
    stall = time.perf_counter() - started
    manager.wait_durable(600)
    durable = time.perf_counter() - started
    loop.run(storage.close())
    loop.close()
    return stall, durable


def copy_s(state: dict) -> float:
    """Time to clone every tensor: the least any consistent in-memory snapshot costs."""
    started = time.perf_counter()
    copied = {name: tensor.clone() for name, tensor in state.items()}
    elapsed = time.perf_counter() - started
    del copied
    return elapsed


def synchronous_stall_s(client, bucket: str, state: dict, step: int, folder: Path) -> float:
    started = time.perf_counter()
    path = folder / f"step-{step}.pt"
    torch.save(state, path)
    client.upload_file(str(path), bucket, f"sync/step-{step}.pt")
    return time.perf_counter() - started


def storage_upload_s(loop: BackgroundLoop, storage, path: Path, step: int) -> float:
    started = time.perf_counter()
    loop.run(storage.put_file(f"upload-{step}.pt", path))
    return time.perf_counter() - started


def boto3_upload_s(client, bucket: str, path: Path, step: int) -> float:
    started = time.perf_counter()
    client.upload_file(str(path), bucket, f"boto3/upload-{step}.pt")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=128, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)
    process, url = start_moto()
    load_before = os.getloadavg()[0]
    try:
        run(url, args.size_mb, args.repeats)
        # Other processes share the cores; the 1-minute load average shows how much.
        print(f"{os.cpu_count()} cores, 1-minute load average {load_before:.2f} before "
              f"and {os.getloadavg()[0]:.2f} after the run")
    finally:
        process.terminate()
        process.wait(10)


def run(url: str, size_mb: int, repeats: int) -> None:
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    bucket = "bench"
    client.create_bucket(Bucket=bucket)
    state = make_state(size_mb)
    loop = BackgroundLoop()
    # One storage for every upload, created before timing as the boto3 client is.
    storage = open_storage(f"s3://{bucket}/storage", endpoint_url=url, path_style=True)
    loop.run(storage.put_bytes("warm-up", b"x"))
    runs: dict[str, list[float]] = {
        name: [] for name in ("background", "durable", "copy", "sync", "ours", "boto3")
    }
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        payload = folder / "payload.pt"
        torch.save(state, payload)
        size_bytes = payload.stat().st_size
        for step in range(repeats):
            stall, until_durable = background_stall_s(url, bucket, state, step)
            runs["background"].append(stall)
            runs["durable"].append(until_durable)
            runs["copy"].append(copy_s(state))
            runs["sync"].append(synchronous_stall_s(client, bucket, state, step, folder))
            runs["ours"].append(storage_upload_s(loop, storage, payload, step))
            runs["boto3"].append(boto3_upload_s(client, bucket, payload, step))
    loop.run(storage.close())
    loop.close()
    print_table(runs, size_bytes / 2**20, repeats)


def print_table(runs: dict[str, list[float]], mib: float, repeats: int) -> None:
    median = {name: statistics.median(values) for name, values in runs.items()}
    stall = median["background"]
    print(f"checkpoint {mib:.0f} MiB, median of {repeats} runs, moto server on 127.0.0.1\n")
    print("| measurement | worker | baseline | worker / baseline |")
    print("|---|---|---|---|")
    print(
        f"| stall vs in-memory tensor copy (s) | {stall:.3f} | {median['copy']:.3f} "
        f"| {stall / median['copy']:.2f} |"
    )
    print(
        f"| stall vs synchronous save and upload (s) | {stall:.3f} | {median['sync']:.3f} "
        f"| {stall / median['sync']:.2f} |"
    )
    print(
        f"| upload throughput (MiB/s) | {mib / median['ours']:.0f} "
        f"| {mib / median['boto3']:.0f} | {median['boto3'] / median['ours']:.2f} |"
    )
    print(f"\nbackground save until durable: {median['durable']:.3f} s, while training continues")


if __name__ == "__main__":
    main()
