import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.cli import RunDirError, check_run_dir

REPO = Path(__file__).resolve().parent.parent


def _pipeline(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "wandb.mode=disabled"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})  # fmt: skip


def test_stage_errors_are_one_line_without_a_traceback(tmp_path):
    a_file = tmp_path / "run"
    a_file.write_text("not a directory")
    result = _pipeline("harvest", f"run_dir={a_file}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        f"error: run_dir={a_file}: {a_file} is a file, not a directory; choose another run_dir"
        in result.stderr
    )

    result = _pipeline("train", f"run_dir={tmp_path / 'ok'}", "train.lr=-1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: train.lr=-1.0 must be positive" in result.stderr

    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_text("{not json")
    (sae / "sae.safetensors").write_bytes(b"")
    result = _pipeline("evaluate", f"run_dir={tmp_path / 'ok'}", f"evaluate.saes=[{sae}]")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {sae / 'cfg.json'} is not valid JSON" in result.stderr


def test_the_traceback_shows_with_hydra_full_error(tmp_path):
    result = _pipeline("train", f"run_dir={tmp_path}", "train.lr=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert (
        result.returncode == 1
        and "Traceback" in result.stderr
        and "train.lr=-1.0 must be positive" in result.stderr
    )


def test_a_read_only_run_dir_is_refused(tmp_path, monkeypatch):
    check_run_dir(tmp_path / "new" / "run")  # a directory that can be made is fine
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    with pytest.raises(RunDirError, match=f"run_dir={tmp_path}/x: {tmp_path} is not writable"):
        check_run_dir(tmp_path / "x")


def test_os_errors_name_the_file():
    err = PermissionError(13, "Permission denied", "/data/run/activations")
    assert cli.one_line(err) == (
        "/data/run/activations: Permission denied; check that run_dir and the paths given are writable directories"
    )
    assert json.dumps(cli.one_line(RunDirError("a\n  b"))) == '"a b"'
