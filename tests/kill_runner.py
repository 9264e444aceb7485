"""Test-only: run a stage as its command, killed with SIGKILL at a chosen call, as a power cut or
the OOM killer would (no cleanup, no ``finally``). The stages have no fault hook of their own.

    python tests/kill_runner.py FUNCTION N before|after STAGE

SIGKILLs the process at the N-th call of FUNCTION (a dotted name such as ``os.replace``), instead
of the call ("before") or right after it returns ("after"), then runs ``python -m pipeline.STAGE``.
"""
import importlib
import os
import runpy
import signal
import sys

target, n, when, stage = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
owner, name = target.rsplit(".", 1)
module = importlib.import_module(owner)
real = getattr(module, name)
calls = 0


def killing(*args, **kwargs):
    global calls
    calls += 1
    if calls != n:
        return real(*args, **kwargs)
    if when == "after":
        real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


setattr(module, name, killing)
sys.argv = [f"pipeline.{stage}", *sys.argv[5:]]
runpy.run_module(f"pipeline.{stage}", run_name="__main__", alter_sys=True)
