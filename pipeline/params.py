"""Reading and validating ``params.yaml``, the single source of every budget and seed (its rules
are ``pipeline.schema``), and running a stage as a command (``run_stage``: ``--help``, checked
inputs, one line per error).

Stages get the validated model, :class:`pipeline.schema.Params` (``params.generate.seed``), never
the dict: :func:`load_params` reads and checks the file, :func:`check_params` turns a dict (a test's
``tiny_params_for()``, a sweep's overrides) into the model.

Budgets: ``budget: full`` (as shipped) runs params.yaml as written. ``budget: smoke`` (``dvc
exp run -S budget=smoke``) merges ``presets.smoke`` over it when the params are loaded
(:func:`apply_budget`, on the file's dict, before validation): a preset is a part of
params.yaml's tree; where it holds a mapping, the mapping's keys are merged one by one, and any
other value (number, text, list) replaces the base value. Every key of a preset must exist in
the base params (else a :class:`ParamsError`, one line naming it), and the merged params are
validated like any others. Under a preset, its values win: to change one of them for a run, set
it in the preset (``-S presets.smoke.attack.prompts=4``). The smoke preset cuts steps, prompts
and images so that every stage of the default concept runs, with every CRT, attack and adapted
filter, in minutes on 2 cores: it checks that the pipeline runs, and its numbers mean nothing.
Stages mark what a smoke run writes (:func:`mark_budget`; the report's banner), and the summary
never mixes budgets. Every stage lists ``budget`` and ``presets`` among its DVC params, so
switching the budget (or editing the preset) reruns them; the frozen ``world`` stage is never
budgeted (a preset may not set ``world``)."""
from __future__ import annotations

import argparse
import copy
import ctypes
import logging
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping, Union

import yaml

from pipeline.concepts import Concept, UnknownConceptError, get_concept, load_registry
from pipeline.schema import (Models, Params, ParamsError, read_yaml_file, unknown_preset_key,
                             validate)

PARAMS_FILE = Path("params.yaml")
SETTINGS = ("mini", "paper")
#: torch's CPU threads in every stage, fixed rather than read from the environment: the thread
#: count changes the bytes of CPU training (finetune's weights differ between 1 and 2 threads),
#: so outputs must not depend on OMP_NUM_THREADS or the machine's core count. 2 is the reference
#: machine's core count; the cost is that a CPU run uses 2 cores on a bigger machine (and two
#: threads share one core on a 1-core machine). GPU work is not affected.
TORCH_THREADS = 2
#: Where stages on this machine hold their claims on GPUs (``claim_device``).
DEVICE_CLAIMS = Path(tempfile.gettempdir()) / f"espresso-devices-{os.getuid()}"
_claimed: list = []  # the open claim of this process, held until it ends

log = logging.getLogger(__name__)
#: The repository this code is in (its dvc.yaml says what each stage reads and writes).
REPO = Path(__file__).resolve().parents[1]

#: Upstream outputs a stage reads -> the stage that writes each, in pipeline order; or a
#: function of the params that gives them.
Needs = Union[Mapping[Union[str, Path], str], Callable[[Params], Mapping[Union[str, Path], str]]]


#: prctl's option: the signal a process gets when its parent ends (linux/prctl.h).
PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """SIGTERM or SIGHUP, raised where the process is (as ctrl-C raises KeyboardInterrupt), so
    that ``finally`` blocks remove temporaries; a BaseException, so no ``except Exception``
    swallows it."""


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end this process as ctrl-C does (:class:`Interrupted`), and, on
    Linux, it gets SIGTERM when what started it ends: a killed ``dvc repro`` or ``accelerate
    launch`` never leaves a stage running as an orphan that races the rerun. The kernel sends it
    when the parent ends (``PR_SET_PDEATHSIG``); DVC runs a stage as ``$SHELL -c "<cmd>"``, and a
    shell that forks rather than execs (dash, the ``/bin/sh`` DVC uses when ``SHELL`` is unset)
    outlives a killed DVC, so under such a shell the shell's own parent is watched too
    (:func:`_watch_shell_parent`). Only the main thread can set handlers: elsewhere (a test's
    thread) nothing is set."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupted(signum, frame):
        # the first signal ends the process; a second one (a pkill that matches both dvc and
        # the stage, a supervisor's repeat) must not interrupt the cleanup it started
        for ignored in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(ignored, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent ended before the request took hold
            os.kill(os.getpid(), signal.SIGTERM)
        _watch_shell_parent(parent)


#: Shells that run ``-c "<cmd>"`` for a stage (DVC's ``$SHELL``, or ``/bin/sh``).
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})
#: How often the watch of :func:`_watch_shell_parent` looks, in seconds.
SHELL_WATCH_PERIOD = 0.5


def _proc_parent(pid: int) -> int | None:
    """``pid``'s parent from ``/proc`` (None once ``pid`` has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _watch_shell_parent(shell: int) -> None:
    """Where this process's parent is a shell running ``-c`` (it exists only to run this
    process), a daemon thread sends this process SIGTERM once that shell's own parent has ended
    (the shell is re-parented), as the kernel does for the direct parent."""
    try:
        with open(f"/proc/{shell}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except OSError:
        return
    if len(argv) < 2 or os.path.basename(argv[0].decode(errors="replace")) not in SHELLS \
            or b"-c" not in argv[1:-1]:
        return
    starter = _proc_parent(shell)
    if starter is None:
        return

    def watch() -> None:
        while _proc_parent(shell) == starter:
            time.sleep(SHELL_WATCH_PERIOD)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="shell-parent-watch", daemon=True).start()


def interrupted_line(err: BaseException) -> tuple[str, int]:
    """The one line and exit status of a command stopped by ctrl-C or :class:`Interrupted`."""
    name = str(err) if isinstance(err, Interrupted) else "SIGINT"
    return f"interrupted ({name})", 128 + signal.Signals[name].value


class MissingInputError(FileNotFoundError):
    """An upstream output a stage reads is not there; the message names the stage to run."""


class DamagedInputError(ValueError):
    """An upstream output a stage reads is missing a part or is damaged (fails its checksum, does
    not load); the message names the file and, where a stage reads it, the stage to rerun."""


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """The params file, checked (:func:`check_params`); a missing file, or any value not allowed,
    is a :class:`ParamsError` with one line per problem, not a stack trace."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root (where dvc.yaml is).")
    return check_params(apply_budget(read_yaml_file(path, path.name)), path.name)


def apply_budget(params: dict) -> dict:
    """``params`` as read from the file, with the preset of its ``budget`` merged over them (a
    copy; ``budget: full``, or none: ``params`` as they are). A mapping of the preset merges into
    the mapping at the same place, key by key; any other value replaces. The merged preset is
    left empty in the result: it is spent, so merged params written back to a file load as they
    are, a value changed in them since included. A preset that is not valid (a key params.yaml
    lacks, say) is not merged: validation names the problem (``pipeline.schema.Params``)."""
    budget = params.get("budget", "full") if isinstance(params, dict) else "full"
    preset = (params.get("presets") or {}).get(budget) if budget != "full" else None
    if not isinstance(preset, dict) or unknown_preset_key(params, preset):
        return params

    def merged(base: dict, over: dict) -> dict:
        return {**base, **{key: merged(base[key], value)
                           if isinstance(value, dict) and isinstance(base[key], dict) else value
                           for key, value in over.items()}}

    return copy.deepcopy({**merged(params, preset),
                          "presets": {**params["presets"], budget: {}}})


def mark_budget(results: dict, params: Params) -> dict:
    """A stage's results as written: under any budget but ``full``, with a ``"budget": <name>``
    key, so that readers of the file see the numbers are not results (full: unchanged)."""
    return results if params.budget == "full" else {"budget": params.budget, **results}


def check_params(params: dict, source: str = PARAMS_FILE.name) -> Params:
    """``params`` as the model the stages take, if every key and value is allowed
    (``pipeline.schema.Params``) and ``concept`` names a concept of the setting in a valid
    registry; else :class:`ParamsError`, one line per problem of either file. ``.model_dump()``
    gives the dict back."""
    try:
        context, problems = {"registry": load_registry()}, []
    except ParamsError as err:
        context, problems = {}, str(err).splitlines()
    try:
        model = validate(Params, params, source, context)
    except ParamsError as err:
        problems += str(err).splitlines()
    if problems:
        raise ParamsError("\n".join(problems))
    return model


def settings_of(params: Params) -> tuple[str, Concept, Models]:
    """The setting, concept and model sources of a run."""
    setting = params.setting
    return setting, get_concept(params.concept, setting), params.models.of(setting)


def run_stage(stage: Callable[[Params], object], needs: Needs | None = None,
              argv: list[str] | None = None, path: str | Path = PARAMS_FILE) -> None:
    """Run a stage as a command. ``--help`` prints the stage module's docstring, what the stage
    reads and writes and its params (from dvc.yaml), and touches nothing. Otherwise: the params
    and the concept registry are checked (:func:`load_params`), each upstream output in
    ``needs`` (path -> the stage that writes it) must exist, then the stage runs, on
    ``TORCH_THREADS`` CPU threads, after what an interrupted run of it left (temporaries among
    its outputs) is removed. A user error (a value not allowed, a missing or damaged input or
    model) ends the command with one ``error:`` line per problem, not a traceback. Started with
    ``accelerate launch`` it runs in every process; the stage splits its work between them.
    SIGTERM, SIGHUP, ctrl-C or its parent's end (:func:`exit_on_signals`) stop it with one
    line, its temporaries removed; an output that cannot be written (disk full, read-only) is
    one line naming it."""
    module = sys.modules[stage.__module__]
    stage_parser(module).parse_args(argv)
    exit_on_signals()
    try:
        _run_checked(stage, needs, path, module)
    except (KeyboardInterrupt, Interrupted) as err:
        line, status = interrupted_line(err)
        print(f"error: {line}: nothing partial was published; rerun the stage", file=sys.stderr)
        sys.exit(status)


def _run_checked(stage: Callable[[Params], object], needs: Needs | None, path: str | Path,
                 module: ModuleType) -> None:
    """``run_stage`` once the signals are set: the checks, the stage, user errors as lines."""
    import torch

    from pipeline.espresso.files import not_writable, remove_stray_temps
    from pipeline.espresso.models import ModelNotAvailableError

    try:
        params = load_params(path)
        for needed, producer in (needs(params) if callable(needs) else needs or {}).items():
            if not Path(needed).exists():
                raise MissingInputError(missing_input_message(Path(needed), producer))
        claim_device()
        state = processes()
        if state.is_main_process:
            remove_stray_temps(stage_outputs(module_name(module).rsplit(".", 1)[-1]))
        state.wait_for_everyone()  # before any process writes: nothing of theirs is removed
        # TORCH_THREADS in every process, whatever their number: a CPU training step's bytes
        # depend on its thread count, so N CPU processes oversubscribe the cores rather than
        # write other bytes than one process (CPU processes test the mechanism; GPUs speed up)
        torch.set_num_threads(TORCH_THREADS)
        stage(params)
    except (ParamsError, UnknownConceptError, ModelNotAvailableError, MissingInputError,
            DamagedInputError) as err:
        sys.exit("\n".join(f"error: {line}" for line in str(err).splitlines()))
    except Exception as err:
        unwritable = not_writable(err, getattr(err, "filename", None) or "an output")
        if unwritable is None:
            raise
        sys.exit(f"error: {unwritable.strerror}")


def claim_device() -> str | None:
    """With several GPUs visible and one process per stage (not started by ``accelerate launch``
    or ``torchrun``), take the first GPU that no other stage on this machine holds, or wait for
    one, and make it the only one visible (``CUDA_VISIBLE_DEVICES``, before CUDA starts). So
    experiments that a queue runs side by side (``dvc queue start --jobs N``, ``python -m
    pipeline.summary --run --jobs N``) each get their own GPU. The claim is an ``flock`` on
    ``DEVICE_CLAIMS/<gpu>.lock``, released when the process ends, killed or not. Returns the GPU
    claimed, or None where there is nothing to choose. The GPU counts from NVML (torch's
    ``device_count`` without starting CUDA) or from ``CUDA_VISIBLE_DEVICES`` where it is set."""
    import fcntl

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # the launcher gave each process its device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    else:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    if len(devices) < 2:
        return None
    DEVICE_CLAIMS.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device in devices:
            claim = open(DEVICE_CLAIMS / f"{device}.lock", "a")
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                claim.close()
                continue
            _claimed.append(claim)
            os.environ["CUDA_VISIBLE_DEVICES"] = device
            log.warning("GPU %s of %s, claimed for this stage", device, ",".join(devices))
            return device
        if not waited:
            log.warning("GPUs %s are all claimed by other stages: waiting for one",
                        ",".join(devices))
            waited = True
        time.sleep(1)


def processes():
    """The processes this stage runs in (accelerate's ``PartialState``): one, unless started by
    ``accelerate launch`` or ``torchrun``; on a machine without a GPU they are CPU processes
    (gloo). Stages split their work between them by global index (``generate``)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def missing_input_message(path: Path, producer: str) -> str:
    if dvc_stage(producer).get("frozen"):
        return (f"{path} not found: it is an output of the frozen stage `{producer}`, committed "
                f"in git: restore it with `git checkout -- {path}`")
    return f"{path} not found: run `dvc repro {producer}` first"


def stage_parser(module: ModuleType) -> argparse.ArgumentParser:
    """The command line of a stage module (``python -m pipeline.<stage>``): its docstring, then
    what dvc.yaml says it reads, writes and which params it uses."""
    name = module_name(module)
    return argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__,
                                   epilog=stage_summary(name.rsplit(".", 1)[-1]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def module_name(module: ModuleType) -> str:
    """``pipeline.<stage>``, also when the module runs as ``__main__``."""
    return module.__spec__.name if module.__spec__ else module.__name__


def dvc_stage(name: str) -> dict:
    """The stage ``name`` of the repository's dvc.yaml ({} where there is none)."""
    dvc_file = REPO / "dvc.yaml"
    if not dvc_file.is_file():
        return {}
    return (yaml.safe_load(dvc_file.read_text()).get("stages") or {}).get(name) or {}


def _paths(entries) -> list[str]:
    """The paths of a dvc.yaml list (``deps``, ``outs``, ...), whose entries are a path or
    ``{path: options}``."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def stage_outputs(name: str) -> list[str]:
    """Everything the stage ``name`` writes, per dvc.yaml (outs, metrics, plots)."""
    stage = dvc_stage(name)
    return sum((_paths(stage.get(key)) for key in ("outs", "metrics", "plots")), [])


def stage_summary(name: str) -> str:
    """What the stage reads (besides code), writes and which params it uses, from dvc.yaml."""
    stage = dvc_stage(name)
    if not stage:
        return ""
    reads = [dep for dep in _paths(stage.get("deps")) if dep.split("/")[0] != "pipeline"]
    writes = stage_outputs(name)
    keys = []
    for entry in stage.get("params") or []:  # a key of params.yaml, or {file: [keys]}
        keys += [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in ks]
    params_file = PARAMS_FILE if PARAMS_FILE.is_file() else REPO / PARAMS_FILE
    own = yaml.safe_load(params_file.read_text()).get(name) if params_file.is_file() else None
    section = f"; {name}: {', '.join(own)}" if isinstance(own, dict) else ""
    run = (f"As a frozen DVC stage: dvc unfreeze {name} && dvc repro {name} && dvc freeze {name}"
           if stage.get("frozen") else
           f"As a DVC stage: dvc repro {name} (from the repository root; runs the stages it needs "
           "first)")
    lines = [("reads:", ", ".join(reads) or "nothing but code"), ("writes:", ", ".join(writes)),
             ("params:", f"{', '.join(keys)} (params.yaml{section})")]
    return "\n".join([run]
                     + [textwrap.fill(text, 96, initial_indent=f"  {label:<8}",
                                      subsequent_indent=" " * 10) for label, text in lines])
