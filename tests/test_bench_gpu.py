"""bench/gpu.py runs on GPU machines only now and then (none in CI): its --smoke mode runs the same
code at toy sizes on the CPU, so the script cannot rot between GPU sessions."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_at_toy_sizes_on_the_cpu(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--json", str(tmp_path / "gpu.json")]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harvest / forward" in result.stdout and (tmp_path / "gpu.json").exists()
