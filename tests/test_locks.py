import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.locks import LockedError, exclusive

HOLDER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from pipeline.locks import exclusive

    with exclusive(Path(sys.argv[1]), "the output"):
        child = os.fork()
        if child == 0:  # lives on after its parent, until the test writes a byte to it
            sys.stdin.buffer.read(1)
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_second_holder_stops_with_a_message_naming_the_first(tmp_path):
    with exclusive(tmp_path / "out", "the output"):
        holder = subprocess.run([sys.executable, "-c", "from pathlib import Path; import sys\n"
                                 "from pipeline.locks import exclusive\n"
                                 "with exclusive(Path(sys.argv[1]), 'the output'): pass", str(tmp_path / "out")],
                                capture_output=True, text=True)  # fmt: skip
    assert holder.returncode != 0
    assert f"the output is being written by process {os.getpid()}" in holder.stderr


def test_a_killed_holder_leaves_no_lock_even_while_its_forked_child_runs(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)  # fmt: skip
    child = int(proc.stdout.readline())
    proc.wait()
    try:
        os.kill(child, 0)  # the child still runs
        with exclusive(tmp_path / "out", "the output"):
            pass
    finally:
        proc.stdin.write(b"x")
        proc.stdin.close()


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    with exclusive(tmp_path / "out", "the output"):
        pytest.raises(LockedError, hold, tmp_path / "out")
    hold(tmp_path / "out")


def hold(target):
    with exclusive(target, "the output"):
        pass
