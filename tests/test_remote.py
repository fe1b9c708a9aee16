"""Run directories on object storage, against a real S3 API on localhost (moto's server): harvest,
kill -9, resume, train, evaluate and analyze on s3://, checked equal to the same stages on local disk;
the bounded shard cache; and bad credentials / a missing bucket / an unreachable endpoint stopping
with one line before any compute."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import fsspec
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from pipeline.corpus import CorpusConfig
from pipeline.faults import KILL_VARIABLE
from pipeline.harvesting import HarvestConfig, harvest_activations
from pipeline.remote import CacheBudget, Remote, RemoteError, ShardCache, cache_bytes
from pipeline.rundir import RunDir
from pipeline.sae import SaeConfig
from pipeline.shards import MANIFEST, ShardError, ShardSet
from pipeline.stages.analyze import AnalyzeConfig, analyze_saes
from pipeline.stages.evaluate import EvaluateConfig, evaluate_saes
from pipeline.stages.train import train_saes
from pipeline.streaming import ModelSource
from pipeline.tracking import WandbConfig
from pipeline.training import TrainConfig
from pipeline.training_plan import plan_training
from tests.conftest import TEXT

REPO = Path(__file__).resolve().parent.parent
HOOK, CTX = "blocks.1.resid_post", 32
OFF = WandbConfig(mode="disabled")
HARVEST = HarvestConfig(hooks=[HOOK], tokens=CTX * 40, context_length=CTX, batch_size=3, sequences_per_shard=4,
                        progress=False)  # fmt: skip
TRAIN = TrainConfig(hook=HOOK, batch_size=128, holdout_tokens=CTX * 8, epochs=3, lr=3e-3, checkpoint_every=0,
                    progress=False, shuffle_shards=2)  # fmt: skip
SAE = SaeConfig(architecture="topk", expansion=4, k=8)


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free localhost port, found through the standard AWS environment."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for var, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            env.setenv(var, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"run-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


def _objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {k[len(root) + 1 :]: fs.cat_file(k) for k in fs.find(root)}


def _files(directory: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob(pattern) if p.is_file()}


# ---------------------------------------------------------------- the stages on s3://


def _killed_harvest(model_cfg, url: str, kill_at: int) -> None:
    script = textwrap.dedent(f"""
        import sys
        from pipeline.corpus import CorpusConfig
        from pipeline.harvesting import HarvestConfig, harvest_activations
        from pipeline.models import ModelConfig
        cfg = HarvestConfig(hooks=[{HOOK!r}], tokens={CTX * 40}, context_length={CTX}, batch_size=3,
                            sequences_per_shard=4, progress=False)
        harvest_activations(ModelConfig(path={model_cfg.path!r}, dtype="float32", device="cpu"),
                            CorpusConfig(name="test", source="files", path={str(TEXT)!r}), cfg, sys.argv[1])
    """)
    env = {**os.environ, KILL_VARIABLE: f"harvest.shard:{kill_at}"}
    proc = subprocess.run([sys.executable, "-c", script, url], cwd=REPO, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL


def test_stages_on_s3_match_local_disk(bucket, model_cfg, loaded, tmp_path, caplog):
    """harvest (killed before shard 6, then resumed), train, evaluate and analyze with run_dir=s3://...
    write the same bytes to the bucket as the same stages write to a local run directory; the logs
    name the outputs by their URL."""
    caplog.set_level("INFO")
    url, local = f"s3://{bucket}/run", tmp_path / "local"
    corpus = CorpusConfig(name="test", source="files", path=str(TEXT))
    _killed_harvest(model_cfg, url, kill_at=6)
    remote_hook = f"activations/{HOOK}"
    partial = _objects(url)
    assert MANIFEST not in {Path(k).name for k in partial}  # the manifest comes last
    assert 0 < sum(k.endswith(".safetensors") for k in partial) <= 6  # the writers may lag behind

    harvest_activations(model_cfg, corpus, HARVEST, url, loaded=loaded)
    harvest_activations(model_cfg, corpus, HARVEST, local, loaded=loaded)
    remote = _objects(url)
    assert {k: v for k, v in remote.items() if k.startswith(remote_hook)} == _files(local, "activations/*/*")
    mirror = Remote(url).mirror
    assert not list(mirror.rglob("shard-*.safetensors"))  # uploaded shards leave the local disk

    for run_dir in (url, local):
        train_saes(TRAIN, SAE, run_dir, OFF)
        evaluate_saes(model_cfg, EvaluateConfig(progress=False, batch_size=3, tokens=CTX * 6), run_dir, OFF, loaded=loaded)
        analyze_saes(model_cfg, AnalyzeConfig(progress=False, top_k=5, samples=8, detail_features=2,
                     detail_examples=2), run_dir, OFF, loaded=loaded)  # fmt: skip
    remote, here = _objects(url), _files(local)
    sae = f"sae/{HOOK}/topk-k8-x4"
    assert remote[f"{sae}/sae.safetensors"] == here[f"{sae}/sae.safetensors"]
    metrics = f"eval/{HOOK}/topk-k8-x4/metrics.json"
    assert json.loads(remote[metrics])["metrics"] == json.loads(here[metrics])["metrics"]
    features = json.loads(remote[f"features/{HOOK}/topk-k8-x4/features.json"])
    assert features["meta"]["config_hash"] == json.loads(here[f"features/{HOOK}/topk-k8-x4/features.json"])["meta"]["config_hash"]
    assert not any(k.startswith("checkpoints/") for k in remote)  # removed once the dictionary is saved
    assert f"-> {url}/{sae}\n" in caplog.text and f"-> {url}/eval/{HOOK}/topk-k8-x4\n" in caplog.text


def test_a_second_machine_finds_the_outputs_done(bucket, model_cfg, loaded, tmp_path, monkeypatch):
    """With an empty local cache (another machine), the stages read what the bucket holds: nothing is
    recomputed or uploaded again, and the dashboard comes down to be browsed."""
    url = f"s3://{bucket}/run"
    corpus = CorpusConfig(name="test", source="files", path=str(TEXT))
    evaluate = EvaluateConfig(progress=False, batch_size=3, tokens=CTX * 6)
    analyze = AnalyzeConfig(progress=False, top_k=5, samples=8, detail_features=2, detail_examples=2)
    harvest_activations(model_cfg, corpus, HARVEST, url, loaded=loaded)
    train_saes(TRAIN, SAE, url, OFF)
    evaluate_saes(model_cfg, evaluate, url, OFF, loaded=loaded)
    analyze_saes(model_cfg, analyze, url, OFF, loaded=loaded)
    before = _objects(url)
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path / "other-machine"))
    harvest_activations(model_cfg, corpus, HARVEST, url, loaded=loaded)
    train_saes(TRAIN, SAE, url, OFF)
    reports = evaluate_saes(model_cfg, evaluate, url, OFF, loaded=loaded)
    dashboard = analyze_saes(model_cfg, analyze, url, OFF, loaded=loaded)[f"{HOOK}/topk-k8-x4"]
    assert _objects(url) == before
    assert reports[f"{HOOK}/topk-k8-x4"]["metrics"]["reconstruction_quality"]["fvu"] < 1
    assert str(dashboard).startswith(str(tmp_path / "other-machine")) and (dashboard / "index.html").exists()


def test_a_marker_only_in_the_mirror_does_not_count_as_done(bucket, model_cfg, loaded):
    """An output is done when the bucket holds its marker: a local leftover (a push killed half-way)
    is trained again and uploaded."""
    url = f"s3://{bucket}/run"
    harvest_activations(model_cfg, CorpusConfig(name="test", source="files", path=str(TEXT)), HARVEST, url,
                        loaded=loaded)  # fmt: skip
    out = train_saes(TRAIN, SAE, url, OFF)["topk-k8-x4"]
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm_file(f"{root}/sae/{HOOK}/topk-k8-x4/cfg.json")
    assert (out / "cfg.json").exists() and not RunDir.open(url).dictionaries()
    train_saes(TRAIN, SAE, url, OFF)
    assert fs.exists(f"{root}/sae/{HOOK}/topk-k8-x4/cfg.json")


def test_sharded_harvest_on_s3_merges_the_workers_manifests(bucket, model_cfg, loaded, tmp_path, monkeypatch):
    """Two workers on two machines (two caches): the last to finish merges both manifests from the
    bucket into the one a single process writes."""
    corpus = CorpusConfig(name="test", source="files", path=str(TEXT))
    single = harvest_activations(model_cfg, corpus, HARVEST, tmp_path / "one", loaded=loaded)[HOOK]
    url = f"s3://{bucket}/run"
    for worker in (1, 0):
        monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path / f"machine-{worker}"))
        merged = harvest_activations(model_cfg, corpus, replace(HARVEST, num_workers=2, worker=worker), url,
                                     loaded=loaded)[HOOK]  # fmt: skip
    assert merged == single
    assert _objects(url)[f"activations/{HOOK}/{MANIFEST}"] == (tmp_path / "one" / "activations" / HOOK / MANIFEST).read_bytes()


def test_training_from_the_model_on_s3(bucket, model_cfg, tmp_path):
    """train.source=model stores only the held-out split, on the bucket, and the dictionary beside it."""
    url = f"s3://{bucket}/run"
    cfg = replace(TRAIN, source="model", tokens=128 * 6, buffer_tokens=512, shuffle_shards=None)
    source = ModelSource(model_cfg, CorpusConfig(name="test", source="files", path=str(TEXT)), HARVEST)
    train_saes(cfg, SAE, url, OFF, source)
    stored = [k for k in _objects(url) if k.startswith("activations/")]
    assert f"activations/{HOOK}/{MANIFEST}" in stored and len(stored) == 1 + CTX * 8 // (CTX * 4)
    assert f"sae/{HOOK}/topk-k8-x4/cfg.json" in _objects(url)


# ---------------------------------------------------------------- the shard cache


@pytest.fixture
def remote_shards(bucket, model_cfg, loaded):
    url = f"s3://{bucket}/run"
    harvest_activations(model_cfg, CorpusConfig(name="test", source="files", path=str(TEXT)), HARVEST, url,
                        loaded=loaded)  # fmt: skip
    return RunDir.open(url)


def _shard_bytes(run: RunDir) -> int:
    """The size of a shard file of HOOK on the bucket (the harvest writes them all the same size)."""
    return run.remote.fs.size(run.remote.key(run.activations(HOOK) / "shard-00000.safetensors"))


def test_cache_holds_at_most_its_capacity(remote_shards):
    """Reading every window in order through a cache of two shards: never more than two on disk."""
    directory, remote = remote_shards.activations(HOOK), remote_shards.remote
    shard_bytes = _shard_bytes(remote_shards)
    cache = ShardCache(remote, directory, budget=CacheBudget(2 * shard_bytes), read_ahead=1)
    shards = ShardSet(directory, cache=cache)
    held = []
    for window in range(shards.manifest.n_sequences):
        shards.sequence(window)
        held.append(len(list(directory.glob("shard-*.safetensors"))))
    cache.close()
    assert max(held) <= 2 and cache.downloaded >= len(shards.manifest.shards) == 10


def _shard_bytes_on_disk(*directories: Path) -> int:
    """Bytes of shard files in these directories, temporaries of downloads under way included (a file
    renamed or evicted by a download thread between listing and reading its size is not counted)."""
    total = 0
    for path in (p for d in directories for p in d.glob("*shard-*")):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


class _GatedFs:
    """An fsspec filesystem whose downloads all pause at their end until `parties` are written, when
    `at_gate` runs once: a deterministic moment with every download in flight at once."""

    def __init__(self, fs, parties: int, at_gate):
        self._fs, self._gate = fs, threading.Barrier(parties, action=at_gate, timeout=60)

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="rb"):
        data, gate = self._fs.cat_file(path), self._gate

        class Reader(io.BytesIO):
            def read(self, size=-1):
                block = super().read(size)
                if not block:
                    gate.wait()
                return block

        return Reader(data)


def _two_shard_cache_holding_the_first_two(run: RunDir, read_ahead: int) -> tuple[ShardCache, list]:
    """A cache of HOOK with room for two shards, the first two read into it, and the shards' records."""
    directory = run.activations(HOOK)
    cache = ShardCache(run.remote, directory, budget=CacheBudget(2 * _shard_bytes(run)), read_ahead=read_ahead)
    records = ShardSet(directory, cache=cache).manifest.shards
    for record in records[:2]:
        cache.open(record, lambda path: None)
    return cache, records


def test_downloads_in_flight_count_against_the_capacity(remote_shards):
    """Two shards resident, two downloads under way at once in a cache of two: the temporaries being
    written never sit beside a full cache."""
    directory, remote = remote_shards.activations(HOOK), remote_shards.remote
    cache, records = _two_shard_cache_holding_the_first_two(remote_shards, read_ahead=2)
    measured = []
    cache.remote = copy.copy(remote)
    cache.remote.fs = _GatedFs(remote.fs, 2, lambda: measured.append(_shard_bytes_on_disk(directory)))
    cache.prefetch(records[2:4])
    for record in records[2:4]:
        cache.open(record, lambda path: None)
    cache.close()
    assert measured and max(measured) <= 2 * _shard_bytes(remote_shards)
    assert cache.resident() == {records[2].name, records[3].name}


def test_shards_an_earlier_process_left_count_against_the_bound(remote_shards):
    """A second process (a fresh cache of two shards) reading two other shards deletes the two the
    first one left, oldest first, rather than holding four; a shard it finds whole is not downloaded."""
    directory = remote_shards.activations(HOOK)
    first, records = _two_shard_cache_holding_the_first_two(remote_shards, read_ahead=1)
    first.close()
    os.utime(directory / records[1].name, (1, 1))  # left longest ago: evicted first
    second = ShardCache(remote_shards.remote, directory, budget=CacheBudget(2 * _shard_bytes(remote_shards)), read_ahead=1)
    second.open(records[0], lambda path: None)
    second.open(records[2], lambda path: None)
    second.close()
    assert sorted(p.name for p in directory.glob("shard-*")) == [records[0].name, records[2].name]
    assert second.downloaded == 1


def test_a_shard_deleted_by_another_process_is_downloaded_again(remote_shards):
    """Processes sharing a mirror (DDP ranks) evict each other's shards: one found gone is fetched
    again, not an error."""
    directory, remote = remote_shards.activations(HOOK), remote_shards.remote
    cache = ShardCache(remote, directory, read_ahead=1)
    record = ShardSet(directory, cache=cache).manifest.shards[0]
    data = cache.open(record, Path.read_bytes)
    (directory / record.name).unlink()  # as the other process's cache does
    assert cache.open(record, Path.read_bytes) == data and cache.downloaded == 2
    cache.close()


def test_the_hooks_of_a_run_share_one_cache_bound(bucket, model_cfg, loaded, monkeypatch):
    """A transcoder's two hooks read window by window through the run's caches (each reading two
    shards ahead): both hooks' shards together stay within $SAE_PIPELINE_CACHE_GB, and training
    mixes groups of shards that fit the bound for both hooks."""
    url, hooks = f"s3://{bucket}/run", ["blocks.0.resid_post", HOOK]
    harvest_activations(model_cfg, CorpusConfig(name="test", source="files", path=str(TEXT)),
                        replace(HARVEST, hooks=hooks), url, loaded=loaded)  # fmt: skip
    run = RunDir.open(url)
    shard_bytes = _shard_bytes(run)
    monkeypatch.setenv("SAE_PIPELINE_CACHE_GB", str(6 * shard_bytes / 2**30))
    first, second = (run.shards(hook) for hook in hooks)
    held = []
    for window in range(first.manifest.n_sequences):
        first.sequence(window)
        second.sequence(window)
        held.append(_shard_bytes_on_disk(*(run.activations(hook) for hook in hooks)))
    assert max(held) <= 6 * shard_bytes and min(held) > 0
    transcoder = SaeConfig(architecture="transcoder", expansion=4, k=8)
    groups = [plan_training(replace(TRAIN, hook=HOOK, shuffle_shards=None), SAE, run).cfg.shuffle_shards,
              plan_training(replace(TRAIN, hook=hooks[0], hook_out=HOOK, shuffle_shards=None), transcoder,
                            run).cfg.shuffle_shards]  # fmt: skip
    assert groups == [3, 1]  # two groups (one read, one read ahead) per hook in six shards


def test_a_corrupt_remote_shard_is_never_used(remote_shards):
    directory = remote_shards.activations(HOOK)
    fs, key = remote_shards.remote.fs, remote_shards.remote.key(directory / "shard-00001.safetensors")
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    shards = remote_shards.shards(HOOK)
    shards.sequence(0)
    with pytest.raises(ShardError, match="shard-00001.safetensors is corrupt"):
        shards.sequence(4)
    assert not (directory / "shard-00001.safetensors").exists()


def test_count_token_reads_only_the_tokens(remote_shards):
    """Counting BOS over the training split (planning a training) downloads no activations."""
    shards = remote_shards.shards(HOOK)
    assert shards.count_token(shards.manifest.bos_token_id) == shards.manifest.n_sequences  # BOS starts each window
    assert not list(remote_shards.activations(HOOK).glob("shard-*.safetensors"))


# ---------------------------------------------------------------- access checked before compute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_bucket_stops_with_one_line(s3_endpoint):
    with pytest.raises(RemoteError, match="the bucket does not exist"):
        RunDir.open(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run")


def test_bad_credentials_stop_with_one_line(tmp_path):
    """A moto server that checks signatures: unknown keys are refused before anything runs."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(port)
        with pytest.MonkeyPatch.context() as mp:
            for var, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "wrong",
                               "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
                mp.setenv(var, value)
            s3fs.S3FileSystem.clear_instance_cache()
            with pytest.raises(RemoteError, match="access denied.*AWS_ACCESS_KEY_ID"):
                RunDir.open("s3://bucket/run")
    finally:
        server.terminate()
        server.wait(timeout=30)
        s3fs.S3FileSystem.clear_instance_cache()


def _wait_for(port: int, timeout: float = 30) -> None:
    """Until the server accepts connections (polling, as a server's start has no signal to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"moto server on port {port} did not start")


def test_unreachable_endpoint_stops_the_stage_before_compute(tmp_path):
    """The command line: one line on stderr, exit status 1, no model loaded and no logs written."""
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
           "SAE_PIPELINE_CACHE": str(tmp_path / "cache")}  # fmt: skip
    cmd = [sys.executable, "-m", "pipeline", "harvest", "run_dir=s3://bucket/run", "model.device=cpu"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: run_dir=s3://bucket/run: cannot reach the storage at http://127.0.0.1:" in result.stderr
    assert "check AWS_ENDPOINT_URL" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_cache_size_that_is_not_a_number_is_refused(monkeypatch):
    monkeypatch.setenv("SAE_PIPELINE_CACHE_GB", "lots")
    with pytest.raises(RemoteError, match="SAE_PIPELINE_CACHE_GB='lots' is not a number of GiB"):
        cache_bytes()
    monkeypatch.setenv("SAE_PIPELINE_CACHE_GB", "0.5")
    assert cache_bytes() == 2**29


def test_nothing_is_s3_specific_any_fsspec_url_works(model_cfg, loaded, tmp_path):
    """run_dir on another fsspec filesystem (memory://, in this process) harvests and trains to the same
    shard and dictionary bytes as local disk: the remote path only speaks fsspec's interface."""
    url, local = f"memory://runs/{uuid.uuid4().hex[:8]}", tmp_path / "local"
    corpus = CorpusConfig(name="test", source="files", path=str(TEXT))
    for run_dir in (url, local):
        harvest_activations(model_cfg, corpus, HARVEST, run_dir, loaded=loaded)
        train_saes(TRAIN, SAE, run_dir, OFF)
    remote, here = _objects(url), _files(local)
    sae = f"sae/{HOOK}/topk-k8-x4/sae.safetensors"
    assert remote[sae] == here[sae]
    assert {k: v for k, v in remote.items() if k.startswith("activations/")} == _files(local, "activations/*/*")


def test_missing_credentials_and_unknown_schemes_stop_with_one_line(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup for credentials
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(RemoteError, match=r"^run_dir=s3://bucket/run: no credentials found .*set AWS_ACCESS_KEY_ID"):
            RunDir.open("s3://bucket/run")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(RemoteError, match=r"fsspec knows no storage scheme foo:// .*use s3://, gs://, hf:// or a local path"):
        RunDir.open("foo://bucket/run")
