import json
import os
import subprocess
import sys
import textwrap

import wandb

from pipeline.tracking import LINKS_VARIABLE, Tracker, WandbConfig
from tests.conftest import staged_by_wandb


def test_wandb_failures_never_stop_a_stage(tmp_path, monkeypatch, caplog):
    def unreachable(**kwargs):
        raise wandb.errors.CommError("network unreachable / not logged in")

    monkeypatch.setattr(wandb, "init", unreachable)
    tracker = Tracker(WandbConfig(mode="online"), tmp_path, "run", {})
    assert not tracker.active and "W&B logging is off" in caplog.text
    tracker.log({"loss": 1.0}, step=1)  # all no-ops
    tracker.summary({"fvu": 0.1})
    tracker.finish()


def test_offline_run_is_written_locally(tmp_path):
    tracker = Tracker(WandbConfig(mode="offline"), tmp_path, "run", {"x": 1})
    assert tracker.active
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_runs_of_one_run_directory_form_a_group(tmp_path, monkeypatch):
    """Every stage's run of a run directory: its group, the stage as job type, a name saying both."""
    seen = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.append(kwargs) or object())
    Tracker(WandbConfig(), tmp_path, "train", {}, group="s3://bucket/run", detail="blocks.9.resid_post")
    Tracker(WandbConfig(), tmp_path, "evaluate", {})
    assert [(k["group"], k["job_type"], k["name"]) for k in seen] == [
        ("s3://bucket/run", "train", "train blocks.9.resid_post · s3://bucket/run"),
        (str(tmp_path), "evaluate", f"evaluate · {tmp_path}"),
    ]


def test_a_table_charts_one_row_per_dictionary(tmp_path):
    tracker = Tracker(WandbConfig(mode="offline"), tmp_path, "evaluate", {})
    tracker.table("dictionaries", [{"label": "a", "l0": 32.0, "fvu": 0.1}, {"label": "b", "l0": 64.0, "fvu": 0.08}])
    tracker.finish()
    table = json.loads(next((tmp_path / "wandb").glob("offline-run-*/files/media/table/dictionaries*.table.json")).read_text())
    assert table["columns"] == ["label", "l0", "fvu"] and table["data"] == [["a", 32.0, 0.1], ["b", 64.0, 0.08]]


def test_disabled_and_non_zero_ranks_log_nothing(tmp_path):
    assert not Tracker(WandbConfig(mode="disabled"), tmp_path, "run", {}).active
    assert not Tracker(WandbConfig(mode="offline"), tmp_path, "run", {}, rank=1).active


def test_nothing_is_written_outside_the_run_directory(tmp_path):
    """Tables, HTML and images (staged by W&B as artifacts) stay in <run_dir>/wandb/, not the home."""
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    script = textwrap.dedent("""
        import sys
        import wandb
        from pipeline.tracking import Tracker, WandbConfig
        tracker = Tracker(WandbConfig(mode="offline"), sys.argv[1], "run", {})
        table = wandb.Table(columns=["id", "html"])
        table.add_data(0, wandb.Html("<b>token</b>"))
        tracker.log({"features": table, "histogram": wandb.Histogram([0.1, 0.2])})
        tracker.finish()
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    result = subprocess.run([sys.executable, "-c", script, str(run_dir)], env={**env, "HOME": str(home)},
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert [str(p) for p in home.rglob("*")] == []


def test_a_moved_run_directory_syncs_its_whole_table(tmp_path, monkeypatch):
    """W&B records staged files by absolute path; they go through a link of the same name on every
    machine, which `python -m pipeline.tracking <run_dir>` points at wherever the run directory went."""
    import shutil

    monkeypatch.setenv(LINKS_VARIABLE, str(tmp_path / "links"))
    first = tmp_path / "first"
    tracker = Tracker(WandbConfig(mode="offline"), first, "analyze", {})
    table = wandb.Table(columns=["id", "html"])
    table.add_data(0, wandb.Html("<b>token</b>"))
    tracker.log({"features": table})
    tracker.finish()
    wandb.teardown()  # W&B's service closes the run's log after finish() returns
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(first, moved)
    shutil.rmtree(tmp_path / "links")  # another machine: no link yet
    staged = staged_by_wandb(moved)
    assert len(staged) == 2 and not any(p.exists() for p in staged)  # the table and its HTML cell
    result = subprocess.run([sys.executable, "-m", "pipeline.tracking", str(moved)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and "wandb sync" in result.stdout, result.stderr
    assert all(p.is_file() and (moved / "wandb") in p.resolve().parents for p in staged)
