import wandb

from pipeline.tracking import Tracker, WandbConfig


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


def test_disabled_and_non_zero_ranks_log_nothing(tmp_path):
    assert not Tracker(WandbConfig(mode="disabled"), tmp_path, "run", {}).active
    assert not Tracker(WandbConfig(mode="offline"), tmp_path, "run", {}, rank=1).active
