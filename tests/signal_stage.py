"""Test-only: a stage run by ``pipeline.params.run_stage`` (as ``python -m pipeline.<stage>``
is) that holds an output's temporary open and waits to be stopped, or writes to a full disk.

    python tests/signal_stage.py wait|full OUTPUT

``wait``: writes its pid to ``OUTPUT.pid`` once its temporary of OUTPUT exists, then sleeps.
``full``: writes OUTPUT through ``/dev/full`` (a real ENOSPC from the kernel).
"""
import os
import shutil
import sys
import time
from pathlib import Path

from pipeline.espresso.files import atomic_file
from pipeline.params import REPO, run_stage

mode, output = sys.argv[1], Path(sys.argv[2])


def stage(params) -> None:
    with atomic_file(output) as tmp:
        if mode == "full":
            with open("/dev/zero", "rb") as zeros, open("/dev/full", "wb") as full:
                shutil.copyfileobj(zeros, full, 1 << 16)
        tmp.write_text("half")
        output.with_suffix(".pid").write_text(str(os.getpid()))
        time.sleep(600)


if __name__ == "__main__":
    run_stage(stage, argv=[], path=REPO / "params.yaml")
