import os
import subprocess
import sys

import pytest

from pipeline.locks import LockedError, exclusive


def test_a_second_holder_stops_with_a_message_naming_the_first(tmp_path):
    with exclusive(tmp_path / "out", "the output"):
        holder = subprocess.run([sys.executable, "-c", "from pathlib import Path; import sys\n"
                                 "from pipeline.locks import exclusive\n"
                                 "with exclusive(Path(sys.argv[1]), 'the output'): pass", str(tmp_path / "out")],
                                capture_output=True, text=True)  # fmt: skip
    assert holder.returncode != 0
    assert f"the output is being written by process {os.getpid()}" in holder.stderr


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    with exclusive(tmp_path / "out", "the output"):
        pytest.raises(LockedError, hold, tmp_path / "out")
    hold(tmp_path / "out")


def hold(target):
    with exclusive(target, "the output"):
        pass
