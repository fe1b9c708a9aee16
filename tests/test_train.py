import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.faults import KILL_VARIABLE
from pipeline.harvesting import HarvestConfig, harvest_activations
from pipeline.locks import LockedError, exclusive
from pipeline.rundir import RunDir
from pipeline.sae import Sae, SaeConfig, architectures
from pipeline.shards import ShardError, ShardSet, shard_name
from pipeline.stages.train import train_saes
from pipeline.streaming import ModelSource
from pipeline.tracking import WandbConfig
from pipeline.training import TrainConfig, TrainError, heldout_metrics, training_batches
from pipeline.training_plan import plan_training
from tests.conftest import copy_run, make_shard_set

HOOK = "blocks.1.resid_post"
REPO = Path(__file__).resolve().parent.parent
OFF = WandbConfig(mode="disabled")


def _cfg(**kw):
    base = dict(
        hook=HOOK,
        batch_size=128,
        holdout_tokens=256,
        epochs=10,
        lr=3e-3,
        lr_warmup_steps=2,
        dead_tokens=512,
        log_every=5,
        checkpoint_every=0,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


SAE = SaeConfig(architecture="topk", expansion=4, k=4)
TRANSCODER = SaeConfig(architecture="transcoder", expansion=4, k=4)


@pytest.fixture
def run_dir(tmp_path):
    make_shard_set(tmp_path / "activations" / HOOK)
    return tmp_path


def _weights(directory: Path) -> dict:
    return load_file(directory / "sae.safetensors")


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").rglob("*.safetensors"))


def _checkpoint_step(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["state"])["step"]


def test_train_saves_a_loadable_dictionary(run_dir):
    out = train_saes(_cfg(), SAE, run_dir, OFF)["topk-k4-x4"]
    assert out == run_dir / "sae" / HOOK / "topk-k4-x4"
    sae = Sae.load(out)
    cfg = sae.config_dict()
    assert cfg["model_id"] == "synthetic" and cfg["hook"] == HOOK and cfg["d_in"] == 16 and cfg["d_sae"] == 64
    metrics = cfg["metrics"]
    assert metrics["heldout_tokens"] == 8 * 31  # 8 held-out sequences of 32 tokens minus BOS
    assert metrics["fvu"] < 0.3 and metrics["l0"] <= 4
    assert 0 <= metrics["silent_fraction"] <= 1 and 0 <= metrics["dead_fraction"] <= 1
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert _checkpoints(run_dir) == []


def test_variants_train_together_exactly_as_alone(run_dir, tmp_path_factory):
    both = train_saes(_cfg(variants=[{"k": 4}, {"k": 8}]), SAE, run_dir, OFF)
    assert set(both) == {"topk-k4-x4", "topk-k8-x4"}
    alone_dir = tmp_path_factory.mktemp("alone")
    make_shard_set(alone_dir / "activations" / HOOK)
    alone = train_saes(_cfg(), SaeConfig(architecture="topk", expansion=4, k=8), alone_dir, OFF)
    for name, tensor in _weights(alone["topk-k8-x4"]).items():
        torch.testing.assert_close(_weights(both["topk-k8-x4"])[name], tensor, msg=name)


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu"])
def test_other_architectures_train(run_dir, arch):
    sae_cfg = SaeConfig(architecture=arch, expansion=4, k=4, l1_coefficient=0.3, l0_coefficient=0.01)
    out = next(iter(train_saes(_cfg(), sae_cfg, run_dir, OFF).values()))
    metrics = Sae.load(out).config_dict()["metrics"]
    assert metrics["fvu"] < 0.6 and 0 < metrics["l0"] < 64


def test_signum_optimizer(run_dir):
    out = train_saes(_cfg(optimizer="signum", lr=2e-2), SAE, run_dir, OFF)["topk-k4-x4"]
    assert Sae.load(out).config_dict()["metrics"]["fvu"] < 0.5


@pytest.mark.parametrize(("key", "earlier", "later"), [("average_power", 0.0, 3.0), ("dead_lr_scale", 1.0, 3.0)])
def test_a_setting_added_later_trains_anew_away_from_its_earlier_value(run_dir, caplog, key, earlier, later):
    uniform = _cfg(optimizer="signum", lr=2e-2, **{key: earlier})
    out = train_saes(uniform, SAE, run_dir, OFF)["topk-k4-x4"]
    before = _weights(out)
    caplog.set_level("INFO")
    train_saes(replace(uniform, **{key: earlier}), SAE, run_dir, OFF)
    assert "already trained" in caplog.text
    caplog.clear()
    train_saes(replace(uniform, **{key: later}), SAE, run_dir, OFF)
    assert "already trained" not in caplog.text
    assert not torch.equal(_weights(out)["W_enc"], before["W_enc"])
    assert Sae.load(out).config_dict()["metrics"]["fvu"] < 0.5


def test_rerun_skips_finished_training(run_dir, caplog):
    train_saes(_cfg(), SAE, run_dir, OFF)
    caplog.set_level("INFO")
    train_saes(_cfg(), SAE, run_dir, OFF)
    assert "already trained" in caplog.text


# a clock that advances a minute each time it is read: checkpoint_minutes=2 is due every other read
_FAKE_CLOCK = "import itertools, pipeline.stages.train as t; t.time.perf_counter = itertools.count(0, 60).__next__"


BALANCED = SaeConfig(architecture="batchtopk", expansion=4, k=4, balance=0.25)


@pytest.mark.parametrize(
    ("schedule", "clock", "sae"),
    [("checkpoint_every=4, checkpoint_minutes=0", "", SAE), ("checkpoint_every=0, checkpoint_minutes=2", _FAKE_CLOCK, SAE),
     ("checkpoint_every=4, checkpoint_minutes=0", "", BALANCED)],
    ids=["by-steps", "by-minutes", "balanced-batchtopk"],
)  # fmt: skip
def test_kill_and_resume_gives_the_uninterrupted_weights(run_dir, tmp_path_factory, schedule, clock, sae):
    """kill -9 at step 10 (after a checkpoint), re-run: the final weights equal an uninterrupted run's
    (balanced BatchTopK: its firing rates resume too, or the selection and the thresholds differ)."""
    script = textwrap.dedent(f"""
        import sys
        from pipeline.sae import SaeConfig
        from pipeline.stages.train import train_saes
        from pipeline.tracking import WandbConfig
        from pipeline.training import TrainConfig
        {clock}
        cfg = TrainConfig(hook={HOOK!r}, batch_size=128, holdout_tokens=256, epochs=10, lr=3e-3,
                          lr_warmup_steps=2, dead_tokens=512, log_every=5, {schedule}, progress=False)
        train_saes(cfg, SaeConfig(**{asdict(sae)!r}), sys.argv[1], WandbConfig(mode="disabled"))
    """)
    env = {**os.environ, KILL_VARIABLE: "train.step:10"}
    proc = subprocess.run([sys.executable, "-c", script, str(run_dir)], cwd=REPO, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    (checkpoint,) = _checkpoints(run_dir)
    assert _checkpoint_step(checkpoint) == 8 if clock == "" else 0 < _checkpoint_step(checkpoint) <= 10
    name = sae.default_name()
    assert not (run_dir / "sae" / HOOK / name / "sae.safetensors").exists()

    resumed = train_saes(_cfg(checkpoint_every=4), sae, run_dir, OFF)[name]
    assert _checkpoints(run_dir) == []
    fresh_dir = tmp_path_factory.mktemp("fresh")
    make_shard_set(fresh_dir / "activations" / HOOK)
    fresh = train_saes(_cfg(checkpoint_every=4), sae, fresh_dir, OFF)[name]
    for tensor_name, tensor in _weights(fresh).items():
        torch.testing.assert_close(_weights(resumed)[tensor_name], tensor, msg=tensor_name, rtol=0, atol=0)


def test_a_balanced_batchtopk_saves_a_threshold_per_latent_and_keeps_k_latents_a_token(run_dir):
    """The thresholds differ by the latents' firing rates in training (plain BatchTopK: one value);
    held-out tokens still get about k latents."""
    balanced = train_saes(_cfg(), BALANCED, run_dir, OFF)[BALANCED.default_name()]
    plain = train_saes(_cfg(), replace(BALANCED, balance=0.0, name="plain"), run_dir, OFF)["plain"]
    assert _weights(balanced)["threshold"].unique().numel() > 1
    assert _weights(plain)["threshold"].unique().numel() == 1
    metrics = json.loads((balanced / "cfg.json").read_text())
    assert metrics["balance"] == 0.25 and abs(metrics["metrics"]["l0"] - 4) < 0.6


def test_checkpoints_of_other_settings_live_side_by_side(run_dir, monkeypatch, caplog, tmp_path_factory):
    """A training killed at its final save keeps its checkpoint while a training with other settings
    runs to the end on the same run directory; re-run, it resumes and ends as if never stopped."""
    from pipeline.stages import train

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        train_saes(_cfg(checkpoint_every=3), SAE, run_dir, OFF)
    monkeypatch.undo()
    (kept,) = _checkpoints(run_dir)
    train_saes(_cfg(checkpoint_every=3, lr=1e-3), SaeConfig(architecture="topk", expansion=4, k=4, name="other"),
               run_dir, OFF)  # fmt: skip
    assert _checkpoints(run_dir) == [kept]
    caplog.set_level("INFO")
    resumed = train_saes(_cfg(checkpoint_every=3), SAE, run_dir, OFF)["topk-k4-x4"]
    assert "resuming from" in caplog.text and _checkpoints(run_dir) == []
    fresh_dir = tmp_path_factory.mktemp("fresh")
    make_shard_set(fresh_dir / "activations" / HOOK)
    fresh = train_saes(_cfg(checkpoint_every=3), SAE, fresh_dir, OFF)["topk-k4-x4"]
    for name, tensor in _weights(fresh).items():
        torch.testing.assert_close(_weights(resumed)[name], tensor, msg=name, rtol=0, atol=0)


def test_a_dictionary_being_written_is_locked_others_train_beside_it(run_dir):
    held = RunDir(run_dir).sae(HOOK, "topk-k4-x4")
    with exclusive(held, "test"):
        with pytest.raises(LockedError, match=rf"topk-k4-x4 is being written by process {os.getpid()} "):
            train_saes(_cfg(), SAE, run_dir, OFF)
        other = train_saes(_cfg(), SaeConfig(architecture="topk", expansion=4, k=8), run_dir, OFF)
        assert Sae.load(other["topk-k8-x4"]).d_sae == 64
    assert Sae.load(train_saes(_cfg(), SAE, run_dir, OFF)["topk-k4-x4"]).d_sae == 64


def test_bad_inputs(run_dir, tmp_path):
    with pytest.raises(TrainError, match="k=64 must be smaller than d_sae=64"):
        train_saes(_cfg(), SaeConfig(expansion=4, k=64), run_dir, OFF)
    with pytest.raises(TrainError, match="expects inputs of width 32.*hold d_model 16"):
        train_saes(_cfg(), SaeConfig(expansion=4, k=4, d_in=32), run_dir, OFF)
    with pytest.raises(TrainError, match="leaves nothing to train on"):
        train_saes(_cfg(holdout_tokens=10**6), SAE, run_dir, OFF)
    with pytest.raises(TrainError, match="fewer than one batch of 1000000; harvest more tokens, or lower train.batch_size"):
        train_saes(_cfg(batch_size=10**6), SAE, run_dir, OFF)
    with pytest.raises(TrainError, match="train.tokens=64 is less than one batch of 128; raise it or lower train.batch_size"):
        train_saes(_cfg(tokens=64), SAE, run_dir, OFF)
    with pytest.raises(ShardError, match="does not exist; run the harvest stage"):
        train_saes(_cfg(hook="blocks.0.resid_pre"), SAE, run_dir, OFF)
    with pytest.raises(TrainError, match="optimizer"):
        _cfg(optimizer="sgd")
    with pytest.raises(TrainError, match="train.lr=0.0 must be positive"):
        _cfg(lr=0.0)
    with pytest.raises(TrainError, match="train.lr_base=-1.0 must be positive"):
        _cfg(lr=None, lr_base=-1.0)


def test_a_corrupt_shard_stops_the_training(run_dir):
    path = run_dir / "activations" / HOOK / shard_name(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00001.safetensors is corrupt"):
        train_saes(_cfg(), SAE, run_dir, OFF)


def test_nan_activations_stop_with_the_batch_index(tmp_path):
    directory = tmp_path / "activations" / HOOK
    make_shard_set(directory)
    path = directory / shard_name(0)
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + 4 * 16 * 5 : header + 4 * 16 * 5 + 4] = bytes.fromhex("0000c07f")  # a NaN at token 5
    path.write_bytes(bytes(data))
    from pipeline.fileio import file_sha256

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = file_sha256(path)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match=r"activation batch \d+ .*contains NaN or Inf"):
        train_saes(_cfg(), SAE, tmp_path, OFF)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                                            reason="needs two GPUs")])],
)  # fmt: skip
def test_two_processes_match_one(run_dir, tmp_path_factory, device):
    """torchrun-style data parallelism (gloo on CPU, NCCL on two GPUs) gives the single-process result."""
    single = train_saes(_cfg(device=device), SAE, run_dir, OFF)["topk-k4-x4"]
    ddp_dir = tmp_path_factory.mktemp("ddp")
    make_shard_set(ddp_dir / "activations" / HOOK)
    script = textwrap.dedent(f"""
        import sys
        from pipeline.sae import SaeConfig
        from pipeline.tracking import WandbConfig
        from pipeline.stages.train import train_saes
        from pipeline.training import TrainConfig
        cfg = TrainConfig(hook={HOOK!r}, batch_size=128, holdout_tokens=256, epochs=10, lr=3e-3, lr_warmup_steps=2,
                          dead_tokens=512, log_every=5, checkpoint_every=0, progress=False, device={device!r})
        train_saes(cfg, SaeConfig(architecture="topk", expansion=4, k=4), sys.argv[1], WandbConfig(mode="disabled"))
    """)
    script_path = ddp_dir / "job.py"
    script_path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script_path), str(ddp_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = ddp_dir / "sae" / HOOK / "topk-k4-x4"
    tolerance = {"atol": 1e-4, "rtol": 1e-3} if device == "cpu" else {"atol": 2e-2, "rtol": 2e-2}  # bf16 on GPU
    for name, tensor in _weights(single).items():
        torch.testing.assert_close(_weights(parallel)[name], tensor, msg=name, **tolerance)


@pytest.mark.gpu
def test_training_on_cuda_in_bf16_reaches_the_cpu_quality(run_dir, tmp_path_factory):
    cpu = Sae.load(train_saes(_cfg(device="cpu"), SAE, run_dir, OFF)["topk-k4-x4"]).config_dict()["metrics"]
    gpu_dir = tmp_path_factory.mktemp("gpu")
    make_shard_set(gpu_dir / "activations" / HOOK)
    gpu = Sae.load(train_saes(_cfg(device="cuda"), SAE, gpu_dir, OFF)["topk-k4-x4"]).config_dict()["metrics"]
    assert gpu["fvu"] == pytest.approx(cpu["fvu"], rel=0.1) and gpu["l0"] == pytest.approx(cpu["l0"], rel=0.1)


@pytest.mark.parametrize("sae_option", sorted(architectures()))
def test_train_configs_compose(sae_option):
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR, to_dataclass

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"sae={sae_option}", "train.variants=[{k: 16}]"])
        assert to_dataclass(SaeConfig, cfg.sae).architecture == sae_option
        assert to_dataclass(TrainConfig, cfg.train).variants == [{"k": 16}]
        assert to_dataclass(WandbConfig, cfg.wandb).mode == "offline"


def test_command_line_with_offline_wandb(run_dir):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        f"run_dir={run_dir}",
        f"train.hook={HOOK}",
        "sae.expansion=4",
        "sae.k=4",
        "train.batch_size=128",
        "train.holdout_tokens=256",
        "train.epochs=2",
        "train.log_every=2",
    ]
    result = subprocess.run(
        cmd,
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "sae" / HOOK / "batchtopk-k4-x4" / "cfg.json").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))


# ---------------------------------------------------------------- train.source=model

MODEL_HOOK = "blocks.1.resid_post"


def _model_cfg(**kw):
    return _cfg(**{"hook": MODEL_HOOK, "source": "model", "tokens": 128 * 20, "buffer_tokens": 512, **kw})


def _source(llama_cfg, text_corpus, **harvest):
    harvest = {"context_length": 32, "batch_size": 8, "sequences_per_shard": 16, "progress": False, **harvest}
    return ModelSource(llama_cfg, text_corpus, HarvestConfig(**harvest))


def test_training_from_the_model_stores_only_the_heldout_split(llama_cfg, text_corpus, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.stages.train"):
        out = train_saes(_model_cfg(), SAE, tmp_path, OFF, _source(llama_cfg, text_corpus))["topk-k4-x4"]
    # the log says what bounded the run: the forward, the wait for windows, the rest
    forward, waiting, rest = map(int, re.search(r"\((\d+) %\) computing .*\((\d+) %\) waiting .*\((\d+) %\) in the SAE", caplog.text).groups())
    assert forward > 0 and 99 <= forward + waiting + rest <= 101
    stored = json.loads((tmp_path / "activations" / MODEL_HOOK / "manifest.json").read_text())
    assert sum(s["n_sequences"] for s in stored["shards"]) == 8  # holdout_tokens=256: 8 windows of 32
    cfg = Sae.load(out).config_dict()
    assert cfg["training_source"] == "model" and cfg["training_tokens"] == 128 * 20
    assert cfg["training_split_tokens"] == 0  # every stored token is held out
    assert cfg["metrics"]["heldout_tokens"] == 8 * 31 and cfg["metrics"]["fvu"] < 1
    assert _checkpoints(tmp_path) == []


def test_variants_at_several_hooks_train_from_one_forward_exactly_as_alone(llama_cfg, text_corpus, tmp_path):
    other = "blocks.2.resid_post"
    variants = [{"k": 4}, {"k": 4, "hook": other}]
    source = _source(llama_cfg, text_corpus)
    both = train_saes(_model_cfg(variants=variants), SAE, tmp_path / "both", OFF, source)
    assert set(both) == {"topk-k4-x4", f"{other}/topk-k4-x4"}
    assert both[f"{other}/topk-k4-x4"] == tmp_path / "both" / "sae" / other / "topk-k4-x4"
    assert Sae.load(both[f"{other}/topk-k4-x4"]).config_dict()["hook"] == other
    alone = train_saes(_model_cfg(hook=other), SAE, tmp_path / "alone", OFF, source)["topk-k4-x4"]
    for name, tensor in _weights(alone).items():
        torch.testing.assert_close(_weights(both[f"{other}/topk-k4-x4"])[name], tensor, msg=name, rtol=0, atol=0)


def test_variants_all_at_other_hooks_than_train_hook(llama_cfg, text_corpus, tmp_path):
    only_other = [{"k": 4, "hook": "blocks.2.resid_post"}, {"k": 8, "hook": "blocks.2.resid_post"}]
    saved = train_saes(_model_cfg(variants=only_other), SAE, tmp_path, OFF, _source(llama_cfg, text_corpus))
    assert set(saved) == {"blocks.2.resid_post/topk-k4-x4", "blocks.2.resid_post/topk-k8-x4"}


def test_a_hook_added_to_a_harvested_run_gets_the_windows_it_holds(llama_cfg, text_corpus, tmp_path):
    """train.source=model in a run with a full harvest at one hook and a variant at another: the new
    hook stores the same windows (it once stored only holdout_tokens, then refused the mismatch)."""
    full = HarvestConfig(hooks=[MODEL_HOOK], tokens=20 * 32, context_length=32, batch_size=8, progress=False)
    harvest_activations(llama_cfg, text_corpus, full, tmp_path)
    other = "blocks.2.resid_post"
    saved = train_saes(_model_cfg(variants=[{}, {"hook": other}]), SAE, tmp_path, OFF, _source(llama_cfg, text_corpus))
    assert set(saved) == {"topk-k4-x4", f"{other}/topk-k4-x4"}
    assert ShardSet(tmp_path / "activations" / other).manifest.n_sequences == 20


def test_training_from_the_model_resumes_after_kill_to_the_same_weights(llama_cfg, text_corpus, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from pipeline.corpus import CorpusConfig
        from pipeline.harvesting import HarvestConfig
        from pipeline.models import ModelConfig
        from pipeline.sae import SaeConfig
        from pipeline.stages.train import train_saes
        from pipeline.streaming import ModelSource
        from pipeline.tracking import WandbConfig
        from pipeline.training import TrainConfig
        cfg = TrainConfig(hook={MODEL_HOOK!r}, source="model", tokens=128 * 20, buffer_tokens=512, batch_size=128,
                          holdout_tokens=256, lr=3e-3, lr_warmup_steps=2, dead_tokens=512, log_every=5,
                          checkpoint_every=4, progress=False)
        source = ModelSource(ModelConfig(path={llama_cfg.path!r}, dtype="float32", device="cpu"),
                             CorpusConfig(source="files", path={text_corpus.path!r}),
                             HarvestConfig(context_length=32, batch_size=8, sequences_per_shard=16, progress=False))
        train_saes(cfg, SaeConfig(architecture="topk", expansion=4, k=4), sys.argv[1], WandbConfig(mode="disabled"),
                   source)
    """)
    killed = tmp_path / "killed"
    env = {**os.environ, KILL_VARIABLE: "train.step:10"}
    proc = subprocess.run([sys.executable, "-c", script, str(killed)], cwd=REPO, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    (checkpoint,) = _checkpoints(killed)
    assert _checkpoint_step(checkpoint) == 8

    source = _source(llama_cfg, text_corpus)
    resumed = train_saes(_model_cfg(checkpoint_every=4), SAE, killed, OFF, source)["topk-k4-x4"]
    fresh = train_saes(_model_cfg(checkpoint_every=4), SAE, tmp_path / "fresh", OFF, source)["topk-k4-x4"]
    for name, tensor in _weights(fresh).items():
        torch.testing.assert_close(_weights(resumed)[name], tensor, msg=name, rtol=0, atol=0)


def test_training_from_the_model_bad_inputs(llama_cfg, text_corpus, tmp_path):
    source = _source(llama_cfg, text_corpus)
    with pytest.raises(TrainError, match="train.source=model needs train.tokens"):
        _cfg(source="model")
    with pytest.raises(TrainError, match="train.source=model needs the model, corpus and harvest settings"):
        train_saes(_model_cfg(), SAE, tmp_path, OFF)
    with pytest.raises(TrainError, match="holdout_tokens must be > 0"):
        train_saes(_model_cfg(holdout_tokens=0), SAE, tmp_path, OFF, source)
    other = HarvestConfig(hooks=[MODEL_HOOK], tokens=16 * 64, context_length=16, progress=False)
    harvest_activations(llama_cfg, text_corpus, other, tmp_path)
    with pytest.raises(TrainError, match="context_length: stored 16, now 32"):
        train_saes(_model_cfg(), SAE, tmp_path, OFF, source)


def test_two_processes_train_from_the_model_on_their_own_windows(llama_cfg, text_corpus, tmp_path):
    """Under torchrun each process computes other windows (streaming.py); process 0 stores the held-out
    split first; the run ends with one dictionary."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pipeline.corpus import CorpusConfig
        from pipeline.harvesting import HarvestConfig
        from pipeline.models import ModelConfig
        from pipeline.sae import SaeConfig
        from pipeline.stages.train import train_saes
        from pipeline.streaming import ModelSource
        from pipeline.tracking import WandbConfig
        from pipeline.training import TrainConfig
        cfg = TrainConfig(hook={MODEL_HOOK!r}, source="model", tokens=128 * 8, buffer_tokens=256, batch_size=128,
                          holdout_tokens=256, lr=3e-3, checkpoint_every=0, progress=False, device="cpu")
        source = ModelSource(ModelConfig(path={llama_cfg.path!r}, dtype="float32", device="cpu"),
                             CorpusConfig(source="files", path={text_corpus.path!r}),
                             HarvestConfig(context_length=32, batch_size=8, progress=False))
        train_saes(cfg, SaeConfig(architecture="topk", expansion=4, k=4), sys.argv[1], WandbConfig(mode="disabled"),
                   source)
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script), str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = Sae.load(tmp_path / "run" / "sae" / MODEL_HOOK / "topk-k4-x4").config_dict()
    assert cfg["training_tokens"] == 128 * 8 and cfg["training_source"] == "model"


@pytest.mark.gpu
def test_training_from_the_model_on_cuda(llama_cfg, text_corpus, tmp_path):
    from dataclasses import replace

    source = _source(replace(llama_cfg, device="cuda"), text_corpus)
    out = train_saes(_model_cfg(device="cuda"), SAE, tmp_path, OFF, source)["topk-k4-x4"]
    cpu = train_saes(_model_cfg(), SAE, tmp_path / "cpu", OFF, _source(llama_cfg, text_corpus))["topk-k4-x4"]
    fvu = [Sae.load(d).config_dict()["metrics"]["fvu"] for d in (out, cpu)]
    assert fvu[0] == pytest.approx(fvu[1], rel=0.1)


def test_train_from_the_model_on_the_command_line(llama_cfg, text_corpus, tmp_path):
    cmd = [sys.executable, "-m", "pipeline", "train", f"run_dir={tmp_path}", f"train.hook={MODEL_HOOK}",
           "train.source=model", "train.tokens=2560", "train.buffer_tokens=512", "train.batch_size=128",
           "holdout_tokens=256", "sae.expansion=4", "sae.k=4", f"model.path={llama_cfg.path}", "model.package=null",
           "model.gguf_file=null", "model.dtype=float32", "corpus=files", f"corpus.path={text_corpus.path}",
           "harvest.context_length=32", "wandb.mode=disabled"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Sae.load(tmp_path / "sae" / MODEL_HOOK / "batchtopk-k4-x4").config_dict()["training_source"] == "model"


def test_outliers_are_left_out_of_training_and_of_its_heldout_metrics(tmp_path):
    """train.exclude_outliers: positions far above the median norm never reach a batch or the held-out metrics."""
    run_dir = tmp_path / "run"
    make_shard_set(run_dir / "activations" / HOOK, outlier_positions=(5, 17))
    cfg = _cfg(exclude_outliers=3.0)
    plan = plan_training(cfg, SAE, RunDir(run_dir))
    assert not plan.keep[5::32].any() and not plan.keep[17::32].any() and plan.keep[6::32].all()
    assert plan.outliers.eligible == plan.n_train // 32 * 29  # BOS and two outliers left out of every window
    batches = training_batches(plan.shards, plan.cfg, plan.n_train, plan.per_epoch, 0, plan.keep)
    for _ in range(plan.per_epoch):
        assert (next(batches).float().norm(dim=-1) <= plan.outliers.limit).all()
    out = train_saes(cfg, SAE, run_dir, OFF)["topk-k4-x4"]
    meta = json.loads((out / "cfg.json").read_text())
    kept = train_saes(_cfg(), SaeConfig(architecture="topk", expansion=4, k=4, name="all"), run_dir, OFF)["all"]
    every = json.loads((kept / "cfg.json").read_text())
    assert meta["outlier_norm_limit"] == pytest.approx(plan.outliers.limit) and "outlier_norm_limit" not in every
    assert meta["metrics"]["heldout_tokens"] == every["metrics"]["heldout_tokens"] // 31 * 29  # per window: 31 after BOS, 29


def test_training_from_the_model_leaves_out_outliers(llama_cfg, text_corpus, tmp_path):
    """train.exclude_outliers with source=model: the limit is the multiple of the stored windows'
    median norm, and the held-out metrics leave the same positions out."""
    source = _source(llama_cfg, text_corpus)
    out = train_saes(_model_cfg(exclude_outliers=1.0), SAE, tmp_path, OFF, source)["topk-k4-x4"]
    meta = Sae.load(out).config_dict()
    shards = ShardSet(tmp_path / "activations" / MODEL_HOOK)
    norms, counted = shards.position_norms(shards.n_tokens, exclude_bos=True)
    median = float(norms[counted].median())
    assert meta["outlier_norm_limit"] == pytest.approx(median)
    assert meta["metrics"]["heldout_tokens"] == int((norms[counted] <= median).sum()) < int(counted.sum())


def test_the_saved_metrics_are_those_of_the_saved_dictionary(run_dir):
    """cfg.json's held-out FVU and L0 equal what the saved weights give on the held-out tokens, for
    every architecture (a JumpReLU's once came from its initial thresholds)."""
    variants = [{}, *({"architecture": a} for a in ("relu", "jumprelu", "batchtopk"))]
    saved = train_saes(_cfg(epochs=3, variants=variants), SAE, run_dir, OFF)
    assert len(saved) == 4
    shards = ShardSet(run_dir / "activations" / HOOK)
    for out in saved.values():
        sae, meta = Sae.load(out), json.loads((out / "cfg.json").read_text())
        again = heldout_metrics(sae, shards, meta["training_split_tokens"], exclude_bos=True)
        assert (again["fvu"], again["l0"]) == pytest.approx((meta["metrics"]["fvu"], meta["metrics"]["l0"]), rel=1e-5)


def test_a_matryoshka_dictionary_reports_the_fvu_of_each_prefix(run_dir):
    """Held-out metrics of sae=matryoshka_batchtopk: each prefix's FVU with its first latents alone,
    falling as the prefix grows; the whole dictionary's is `fvu`."""
    matryoshka = SaeConfig(architecture="matryoshka_batchtopk", expansion=4, k=4, matryoshka_widths=[8, 32, 64])
    out = train_saes(_cfg(), matryoshka, run_dir, OFF)["matryoshka_batchtopk-k4-x4"]
    metrics = json.loads((out / "cfg.json").read_text())["metrics"]
    assert list(metrics["prefix_fvu"]) == ["8", "32"]
    assert metrics["prefix_fvu"]["8"] > metrics["prefix_fvu"]["32"] > metrics["fvu"]
    shards, sae = ShardSet(run_dir / "activations" / HOOK), Sae.load(out)
    idx = torch.arange(shards.n_tokens - 256, shards.n_tokens)
    x = shards.gather(idx[shards.tokens_at(idx) != shards.manifest.bos_token_id]).float()
    with torch.no_grad():
        codes = sae.encode(x)
        alone = (x - codes[:, :8] @ sae.W_dec[:8] - sae.b_dec).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert metrics["prefix_fvu"]["8"] == pytest.approx(float(alone), rel=1e-4)


# ---------------------------------------------------------------- transcoders

TC_IN, TC_OUT = "blocks.1.mlp_in", "blocks.1.mlp_out"


def _heldout_fvu(sae: Sae, x_dir: Path, y_dir: Path, start: int) -> float:
    """The FVU of sae's prediction of y from x over the non-BOS tokens from `start` (computed directly)."""
    xs, ys = ShardSet(x_dir), ShardSet(y_dir)
    idx = torch.arange(start, xs.n_tokens)
    idx = idx[xs.tokens_at(idx) != xs.manifest.bos_token_id]
    x, y = xs.gather(idx).float(), ys.gather(idx).float()
    with torch.no_grad():
        err = (sae(x).x_hat - y).pow(2).sum()
    return float(err / (y - y.mean(0)).pow(2).sum())


def test_a_transcoder_predicts_the_output_hook_from_the_input_hook(transcoder_run):
    """Trained on (mlp_in, mlp_out) pairs of the same tokens, saved acting on raw activations: its
    held-out FVU is that of mlp_out, and an SAE variant at mlp_in beside it reconstructs mlp_in."""
    for name, skip in (("transcoder-k8-x4", False), ("transcoder-skip-k8-x4", True)):
        sae = Sae.load(transcoder_run / "sae" / TC_IN / name)
        meta = sae.config_dict()
        assert sae.transcodes and sae.cfg.skip == skip
        assert (meta["hook"], meta["hook_out"]) == (TC_IN, TC_OUT) and meta["output_scale"] != meta["input_scale"]
        acts = transcoder_run / "activations"
        fvu = _heldout_fvu(sae, acts / TC_IN, acts / TC_OUT, meta["training_split_tokens"])
        assert meta["metrics"]["fvu"] == pytest.approx(fvu, rel=1e-4)
        assert fvu < 0.7  # it learned to predict the MLP (the mean predicts FVU 1)


def test_transcoders_train_beside_saes_as_alone(transcoder_run, tmp_path):
    """A transcoder in a sweep with an SAE at its input hook gets the weights it gets alone."""
    run = copy_run(transcoder_run, tmp_path / "run")
    for directory in (run / "sae").iterdir():
        shutil.rmtree(directory)
    cfg = _cfg(hook=TC_IN, hook_out=TC_OUT, epochs=2)
    together = train_saes(replace(cfg, variants=[{}, {"architecture": "topk"}]), TRANSCODER, run, OFF)
    assert set(together) == {"transcoder-k4-x4", "topk-k4-x4"}
    assert "hook_out" not in Sae.load(together["topk-k4-x4"]).meta
    alone = train_saes(cfg, TRANSCODER, copy_run(transcoder_run, tmp_path / "alone"), OFF)
    for name, tensor in _weights(together["transcoder-k4-x4"]).items():
        torch.testing.assert_close(_weights(alone["transcoder-k4-x4"])[name], tensor, msg=name, rtol=0, atol=0)


def test_a_transcoder_trains_from_the_model(llama_cfg, text_corpus, tmp_path):
    """train.source=model computes both hooks in one forward and stores both held-out splits."""
    cfg = _model_cfg(hook=TC_IN, hook_out=TC_OUT)
    out = train_saes(cfg, TRANSCODER, tmp_path, OFF, _source(llama_cfg, text_corpus))["transcoder-k4-x4"]
    meta = Sae.load(out).config_dict()
    assert meta["hook_out"] == TC_OUT  # (20 steps on a random model: the FVU is no measure of quality here)
    acts = tmp_path / "activations"
    assert meta["metrics"]["fvu"] == pytest.approx(_heldout_fvu(Sae.load(out), acts / TC_IN, acts / TC_OUT, 0), rel=1e-4)


def test_init_from_starts_at_the_saved_dictionary_in_raw_units(run_dir, tmp_path, caplog):
    start = train_saes(_cfg(), SAE, run_dir, OFF)["topk-k4-x4"]
    saved = Sae.load(start)
    other_run = tmp_path / "other"
    make_shard_set(other_run / "activations" / HOOK)
    # a vanishing learning rate: what is saved is the start, folded back into raw units
    out = train_saes(_cfg(lr=1e-12, init_from=str(start), epochs=1), SAE, other_run, OFF)["topk-k4-x4"]
    continued = Sae.load(out)
    for name, tensor in saved.file_tensors().items():
        torch.testing.assert_close(getattr(continued, name), tensor, atol=1e-5, rtol=1e-4)
    assert continued.meta["init_from"]["digest"] == saved.digest()
    moved = shutil.copytree(start, tmp_path / "moved-start")  # the same weights elsewhere: nothing to train
    caplog.set_level("INFO")
    train_saes(_cfg(lr=1e-12, init_from=str(moved), epochs=1), SAE, other_run, OFF)
    assert "already trained with this configuration" in caplog.text
    assert "trained with other settings" not in caplog.text
    fresh = Sae.load(train_saes(_cfg(lr=1e-12, seed=1, epochs=1), SAE, other_run, OFF)["topk-k4-x4"])
    assert "topk-k4-x4 holds a dictionary trained with other settings; this training replaces it" in caplog.text
    assert (fresh.W_dec - saved.W_dec).abs().max() > 0.1  # without init_from: a fresh initialization


def test_init_from_bad_inputs(run_dir, tmp_path):
    with pytest.raises(TrainError, match="is not a loadable dictionary"):
        train_saes(_cfg(init_from=str(tmp_path / "nowhere")), SAE, run_dir, OFF)
    start = train_saes(_cfg(epochs=1), SAE, run_dir, OFF)["topk-k4-x4"]
    with pytest.raises(TrainError, match="16 -> 64 latents, but topk-k4-x8 is topk of 16 -> 128"):
        train_saes(_cfg(init_from=str(start)), SaeConfig(architecture="topk", expansion=8, k=4), run_dir, OFF)
