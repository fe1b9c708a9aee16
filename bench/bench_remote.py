"""A run directory on S3 against the same run on local disk: harvest and train, same model, corpus and
batches, so the dictionaries are byte-identical and only the time differs.

    make bench            (or: python bench/bench_remote.py --tokens 262144)

The S3 endpoint is moto's server on localhost, started here in its own process (no network, no
account): what is measured is this project's machinery (uploads on the writer threads, downloads
read ahead, the sha256 of every shard as it streams in, the bounded cache evicting), not a provider's
bandwidth. Shards are small (32 windows) and the cache holds 8 of them, so training downloads and
evicts throughout. Prints tokens/s of harvest and of the training loop on s3:// ÷ on local disk, and
whether the dictionaries are identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import torch
from bench_stream import timed_training
from default_model import add_dtype_argument, default_model

from pipeline.corpus import CorpusConfig
from pipeline.harvesting import HarvestConfig, harvest_activations, storage_dtype
from pipeline.models import dtype_name, load_model
from pipeline.training import TrainConfig

HOOK = "blocks.9.resid_post"


def start_moto() -> subprocess.Popen:
    """moto's S3 server on a free port, in the AWS environment of this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    raise TimeoutError("moto's server did not start")


def timed_harvest(model_cfg, corpus, cfg, run_dir, loaded) -> float:
    start = time.perf_counter()
    harvest_activations(model_cfg, corpus, cfg, run_dir, loaded=loaded)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262_144, help="tokens harvested")
    add_dtype_argument(parser)
    args = parser.parse_args()

    model_cfg = default_model(args.dtype)
    corpus = CorpusConfig(name="pydoc", source="pydoc")
    loaded = load_model(model_cfg)
    harvest = HarvestConfig(hooks=[HOOK], tokens=args.tokens, sequences_per_shard=32, progress=False)
    train = TrainConfig(hook=HOOK, holdout_tokens=16_384, epochs=1, shuffle_shards=4, progress=False)
    server = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["SAE_PIPELINE_CACHE"] = str(Path(tmp) / "cache")
            item = storage_dtype(harvest.dtype, loaded).itemsize  # fp32 on a CPU without native bf16
            shard_bytes = harvest.sequences_per_shard * harvest.context_length * (loaded.d_model * item + 4)
            os.environ["SAE_PIPELINE_CACHE_GB"] = str(8 * shard_bytes / 2**30)
            fsspec.filesystem("s3").mkdir("bench")
            local, url = Path(tmp) / "local", "s3://bench/run"
            harvest_local = timed_harvest(model_cfg, corpus, harvest, local, loaded)
            harvest_s3 = timed_harvest(model_cfg, corpus, harvest, url, loaded)
            train_local, metrics_local, _ = timed_training(train, local)
            train_s3, metrics_s3, _ = timed_training(train, url)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; S3: moto's server on localhost")  # fmt: skip
    print(f"model: SmolLM2-135M ({dtype_name(loaded.dtype)}) {HOOK}; {args.tokens} tokens in shards of "
          f"{harvest.sequences_per_shard} windows; cache: 8 shards; train.shuffle_shards={train.shuffle_shards}")  # fmt: skip
    print(f"{'':24}{'local s':>10}{'s3:// s':>10}{'s3 / local tok/s':>18}")
    print(f"{'harvest':24}{harvest_local:>10.1f}{harvest_s3:>10.1f}{harvest_local / harvest_s3:>18.3f}")
    print(f"{'training loop':24}{train_local:>10.1f}{train_s3:>10.1f}{train_local / train_s3:>18.3f}")
    same = metrics_local == metrics_s3
    print(f"held-out FVU local {metrics_local['fvu']:.4f}, s3 {metrics_s3['fvu']:.4f}; metrics identical: {same}")


if __name__ == "__main__":
    main()
