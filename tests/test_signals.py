"""Processes end cleanly: SIGTERM to a stage, or to what started it (``dvc repro``), stops the
stage with one line and its temporaries removed, never leaving it running as an orphan; an
interrupted ``summary --run`` removes DVC's temporary repository copies; a disk full or a
read-only output is one line naming the path."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stages import REPO

from pipeline import experiments
from pipeline.espresso.files import OutputNotWritableError, atomic_dir, atomic_file

STAGE = [sys.executable, str(REPO / "tests" / "signal_stage.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended: only its exit is not collected
        return stat.read().split(") ")[-1][0] != "Z"


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def started(output: Path, process: subprocess.Popen) -> int:
    """The stage's pid, once it holds its temporary (imports take a while under load)."""
    pid_file = output.with_suffix(".pid")
    assert wait_for(lambda: pid_file.exists() or process.poll() is not None, 300), "no start"
    assert pid_file.exists(), process.communicate()
    return int(pid_file.read_text())


@pytest.mark.slow  # a stage process: imports torch
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_sigterm_to_what_started_a_stage_leaves_no_stage_running(tmp_path, shell):
    """dvc runs a stage as ``$SHELL -c "python -m pipeline.<stage>"`` (``/bin/sh`` where SHELL
    is unset) and dies at SIGTERM without passing it on: the stage must end with dvc, whether
    the shell execs the stage (bash) or forks it and waits (dash, Debian's /bin/sh)."""
    output = tmp_path / "out.txt"
    runner = ("from dvc.stage.run import _run; "
              f"_run({shell!r}, {' '.join(STAGE + ['wait', str(output)])!r})")
    parent = subprocess.Popen([sys.executable, "-c", runner], env=ENV, cwd=REPO,
                              stderr=subprocess.PIPE, text=True)
    stage = started(output, parent)
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    try:
        assert wait_for(lambda: not alive(stage), 30), "the stage outlived dvc"
    finally:
        if alive(stage):  # the failure's orphan: not left running after the test
            os.kill(stage, signal.SIGKILL)
    assert not output.exists() and [p.name for p in tmp_path.iterdir()] == ["out.pid"]


@pytest.mark.slow  # a stage process: imports torch
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_a_stage_is_one_line_and_removes_its_temporary(tmp_path, signum):
    output = tmp_path / "out.txt"
    process = subprocess.Popen(STAGE + ["wait", str(output)], env=ENV, cwd=REPO,
                               stderr=subprocess.PIPE, text=True)
    started(output, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert stderr.strip().splitlines()[-1] == (f"error: interrupted ({name}): nothing partial "
                                               "was published; rerun the stage")
    assert "Traceback" not in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.pid"]  # the temporary is gone


def test_a_second_signal_does_not_interrupt_the_cleanup_of_the_first():
    """A pkill that matches dvc and the stage, or a supervisor's repeat, sends SIGTERM again
    while the first one's cleanup runs (the temporaries' ``finally``, the interpreter's
    shutdown): it must not raise there too (a traceback after the one-line error)."""
    code = ("import os, signal\n"
            "from pipeline.params import Interrupted, exit_on_signals\n"
            "exit_on_signals()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "except Interrupted:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    os.kill(os.getpid(), signal.SIGHUP)\n"
            "    print('cleaned up')\n")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "cleaned up\n", result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a stage process: imports torch
def test_a_full_disk_stops_a_stage_with_one_line_naming_the_output(tmp_path):
    output = tmp_path / "out.txt"
    result = subprocess.run(STAGE + ["full", str(output)], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {output}: No space left on device: free space on its disk, then rerun")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure, why", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
     "No space left on device: free space on its disk, then rerun"),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                  "\"No space left on device\" })"),  # safetensors' own error
     "No space left on device: free space on its disk, then rerun"),
    (PermissionError(errno.EROFS, os.strerror(errno.EROFS), "/data/x"),
     "Read-only file system: the file system is read-only: run where outputs can be written"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
     "Permission denied: give this user write access to it and its folder"),
])
@pytest.mark.parametrize("helper", [atomic_file, atomic_dir])
def test_an_output_that_cannot_be_written_is_named_and_leaves_nothing(tmp_path, helper, failure,
                                                                      why):
    target = tmp_path / "out"
    with pytest.raises(OutputNotWritableError) as info:
        with helper(target):
            raise failure
    assert info.value.strerror == f"{target}: {why}" and info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_in_an_output_pass_unchanged(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with atomic_file(tmp_path / "out"):
            raise ValueError("a bug")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), experiments.Interrupted("SIGTERM")])
def test_an_interrupted_summary_run_removes_its_copies_with_one_line(tmp_path, monkeypatch,
                                                                     capsys, interrupt):
    """``dvc exp run --temp`` killed with the summary leaves its copy in .dvc/tmp/exps: it is
    removed; a copy that was there before (another run's) is kept."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiments, "exit_on_signals", lambda: None)  # keep pytest's handlers
    other = tmp_path / experiments.EXPERIMENT_COPIES / "tmpother"
    other.mkdir(parents=True)
    calls = []

    def dvc(*args, env=None):
        calls.append(args)
        if len(calls) == 2:  # the second experiment: its copy made, then the interrupt
            (tmp_path / experiments.EXPERIMENT_COPIES / "tmpmine" / "data").mkdir(parents=True)
            raise interrupt
        return ""

    monkeypatch.setattr(experiments, "dvc", dvc)
    with pytest.raises(SystemExit) as info:
        experiments.run_experiments([["-S", "concept=a"], ["-S", "concept=b"],
                                     ["-S", "concept=c"]])
    name = "SIGINT" if isinstance(interrupt, KeyboardInterrupt) else "SIGTERM"
    assert info.value.code == 128 + signal.Signals[name]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: interrupted ({name}): the running experiment stopped, its temporary copy "
        "removed (1 in .dvc/tmp/exps); finished ones are kept (dvc exp show)")
    assert len(calls) == 2
    assert [p.name for p in (tmp_path / experiments.EXPERIMENT_COPIES).iterdir()] == ["tmpother"]
