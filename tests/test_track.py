import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from pipeline.finetune_checkpoints import DONE, step_dir
from pipeline.stages.finetune import FinetuneConfig, finetune
from pipeline.stages.track import TrackConfig, TrackError, track_features
from pipeline.tracking import WandbConfig
from tests.conftest import copy_run

HOOK, SAE = "blocks.1.resid_post", "topk-k8-x4"


def _cfg(checkpoints, **kw) -> TrackConfig:
    return TrackConfig(**{"checkpoints": str(checkpoints), "sae": SAE, "tokens": 32 * 8, "eval_tokens": 32 * 4,
                          "task_tokens": 32 * 4, "top_changed": 10, "top_relevant": 5, "progress": False, **kw})  # fmt: skip


def _unchanged_steps(model_dir, out):
    """A 'fine-tuning' whose steps 5 and 10 are θ₀ itself."""
    settings = json.dumps({"steps": 10})
    shutil.copytree(model_dir, step_dir(out, 5))
    (step_dir(out, 5) / DONE).write_text(settings)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    (out / DONE).write_text(settings)
    return out


@pytest.mark.parametrize("sae", [SAE, "transcoder-k8-x4"])
def test_steps_equal_to_theta_zero_keep_every_feature_and_every_metric(sae, trained_run, transcoder_run, model_cfg,
                                                                       text_corpus, tmp_path):  # fmt: skip
    """(A transcoder is coded from the MLP's input, evaluated and attributed at its output.)"""
    run = copy_run(trained_run if sae == SAE else transcoder_run, tmp_path / "run")
    checkpoints = _unchanged_steps(model_cfg.path, tmp_path / "same")
    page = track_features(model_cfg, text_corpus, _cfg(checkpoints, sae=sae), run, WandbConfig(mode="disabled"))
    report = json.loads((page.parent / "track.json").read_text())
    steps = report["steps"]
    assert [s["step"] for s in steps] == [0, 5, 10] and page.parent == run / "track" / "same"
    for s in steps[1:]:
        assert s["fvu"] == pytest.approx(steps[0]["fvu"], rel=1e-5) and s["kept"] == steps[0]["kept"] > 0
        assert s["shifted"] == s["vanished"] == s["appeared"] == 0 and s["mean_cosine"] == pytest.approx(1.0)
    assert report["most_changed"] == [] and report["relevance"]["moved_share_of_all"] == 0.0
    tensors = load_file(page.parent / "trajectories.safetensors")
    assert tensors["frequency"].shape == tensors["cosine"].shape == (3, 128) and tensors["steps"].tolist() == [0, 5, 10]


def test_a_fine_tuning_moves_features_and_the_page_shows_their_trajectories(trained_run, model_cfg, text_corpus, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    features = run / "features" / HOOK / SAE
    features.mkdir(parents=True)
    (features / "features.json").write_text(json.dumps({"meta": {}, "features": [{"id": i, "fires_on": ["tok<"]} for i in range(128)]}))
    (features / "feature.html").write_text("")
    tuned = finetune(FinetuneConfig(model=model_cfg, corpus=text_corpus, out=str(tmp_path / "tuned"), steps=4,
                                    batch_size=2, context_length=32, lr=3e-2, save_every=2, progress=False))  # fmt: skip
    page = track_features(model_cfg, text_corpus, _cfg(tuned), run, WandbConfig(mode="offline"))
    report = json.loads((page.parent / "track.json").read_text())
    assert [s["step"] for s in report["steps"]] == [0, 2, 4]
    assert report["steps"][-1]["mean_cosine"] < 0.999 and report["most_changed"]
    row = report["most_changed"][0]
    assert row["status"] in ("shifted", "vanished", "appeared") and row["first_step"] in (2, 4)
    assert len(row["frequency"]) == len(row["cosine"]) == 3
    html = page.read_text()
    assert f"href='../../features/{HOOK}/{SAE}/feature.html#{row['id']}'" in html and "<svg" in html
    assert "tok&lt;" in html  # what it fires on, from the dashboard, escaped
    assert "../../../track/tuned/index.html" in (features / "data" / "reports.js").read_text()  # on the index
    tables = list((run / "wandb").glob("offline-run-*/files/media/table/most_changed*.table.json"))
    assert len(tables) == 1


def test_track_bad_inputs(trained_run, model_cfg, text_corpus, tmp_path):
    with pytest.raises(TrackError, match="set track.checkpoints="):
        TrackConfig()
    with pytest.raises(TrackError, match="track.tokens=0 must be positive"):
        _cfg(tmp_path, tokens=0)
    with pytest.raises(TrackError, match="holds no finished fine-tuning.*finetune.save_every=N"):
        track_features(model_cfg, text_corpus, _cfg(tmp_path / "nothing"), trained_run, WandbConfig(mode="disabled"))


def test_track_on_the_command_line(trained_run, model_cfg, text_corpus, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    checkpoints = _unchanged_steps(model_cfg.path, tmp_path / "same")
    cmd = [sys.executable, "-m", "pipeline", "track", f"run_dir={run}", f"track.checkpoints={checkpoints}",
           "track.tokens=256", "track.eval_tokens=128", "track.task_tokens=128", f"model.path={model_cfg.path}",
           "model.package=null", "model.gguf_file=null", "model.dtype=float32", "corpus=files",
           f"corpus.path={text_corpus.path}", "wandb.mode=disabled"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "track" / "same" / "index.html").exists()
