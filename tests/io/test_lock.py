"""One writer per run folder (saescope.core.io.lock): a held lock refuses naming its holder, a lock left by a killed
process is taken over, the lock leaves nothing behind, and every writer of a run folder takes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_one_line_error, run_cli
from saescope.core.errors import SaescopeError
from saescope.core.io.lock import RunLock, run_folder_of

HOLD = """
import sys, time
from saescope.core.io.lock import RunLock
with RunLock(sys.argv[1], "saescope eval --sae held"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(folder, seconds: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(SaescopeError, match=rf"run is in use by another saescope process \(pid {proc.pid} on .*saescope eval "
                                                r"--sae held\); wait for it to finish, or write elsewhere"):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up at all: the lock file stays, naming a dead process
    proc.wait()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == proc.pid
    with RunLock(tmp_path / "run", "the next writer"):
        assert json.loads((tmp_path / "run" / ".lock").read_text())["command"] == "the next writer"
    assert not (tmp_path / "run" / ".lock").exists()


def test_the_lock_leaves_nothing_behind(tmp_path):
    with RunLock(tmp_path / "new"):
        assert (tmp_path / "new" / ".lock").is_file()
    assert not (tmp_path / "new").exists()  # made for the lock, left empty: removed
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "eval.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["eval.json"]


def test_writes_inside_a_run_lock_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "toxicity").mkdir(parents=True)
    (run / "train.json").write_text("{}")
    assert run_folder_of(run / "toxicity" / "rules.json", folder=False) == run.resolve()
    assert run_folder_of(run / "features", folder=True) == run.resolve()
    assert run_folder_of(tmp_path / "elsewhere" / "x.json", folder=False) == (tmp_path / "elsewhere").resolve()


def test_a_command_refuses_a_run_another_process_writes(tiny_sae_dir, tmp_path):
    """eval into a folder held by another writer: one line naming the holder, nothing written."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_sae_dir, run)
    before = sorted(p.name for p in run.iterdir())
    proc = _holder(run)
    try:
        start = time.perf_counter()
        code, _, err = run_cli("eval", "--sae", str(run), "--n-tokens", "64")
        assert_one_line_error(code, err, f"is in use by another saescope process (pid {proc.pid}")
        assert time.perf_counter() - start < 30  # refused before any model is loaded or text read
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == before and not (run / "eval.json").exists()
