"""Data-parallel stages: the outputs are byte-identical for 1 and 2 processes (two CPU
processes under ``torchrun``, gloo: ``accelerate launch`` needs MPI for CPU processes), and an
interrupted parallel run resumes."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from stages import make_stage_dir, stage_command

pytestmark = pytest.mark.slow  # stages in one and two processes, as subprocesses

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def launch(module: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pipeline.<module>`` in two CPU processes (torchrun)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                     os.environ.get("PYTHONPATH")])),
           # each process runs TORCH_THREADS threads (the bytes of CPU training depend on it);
           # busy-waiting OpenMP threads of two processes on shared cores would run ~9x slower
           "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([*LAUNCH, "-m", f"pipeline.{module}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def scratch(path: Path, params: dict) -> Path:
    folder = make_stage_dir(path)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def test_generate_is_byte_identical_on_one_and_two_processes(tmp_path, tiny_params):
    one, two = scratch(tmp_path / "one", tiny_params), scratch(tmp_path / "two", tiny_params)
    assert stage_command("generate", cwd=one).returncode == 0
    result = launch("generate", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generate shards (1 of 2 processes)" in result.stderr
    shards = digests(one / "data/generate")
    assert len([n for n in shards if n.startswith("shard-")]) == 3  # split 2 + 1
    assert digests(two / "data/generate") == shards  # shards and manifest, byte for byte


def test_a_parallel_run_resumes_from_what_an_interrupted_one_finished(tmp_path, tiny_params):
    reference = scratch(tmp_path / "reference", tiny_params)
    assert stage_command("generate", cwd=reference).returncode == 0
    resumed = scratch(tmp_path / "resumed", tiny_params)
    kept = sorted((reference / "data/generate").glob("shard-*.npz"))[1]
    (resumed / "data/generate").mkdir()
    (resumed / "data/generate" / kept.name).write_bytes(kept.read_bytes())  # one shard done
    (resumed / "data/generate" / f".{kept.name}.tmp-x").write_bytes(b"half")  # one cut short
    result = launch("generate", resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert digests(resumed / "data/generate") == digests(reference / "data/generate")


def test_edit_and_attack_are_byte_identical_on_one_and_two_processes(tiny_run, tmp_path,
                                                                    tiny_params):
    """The CRTs' edits and images, and the attack runs (optimisation, trial and final images),
    split between two processes, write what one process wrote (``tiny_run``), byte for byte."""
    one, _ = tiny_run
    two = scratch(tmp_path / "two", tiny_params)
    for upstream in ("data/generate", "data/finetune"):
        shutil.copytree(one / upstream, two / upstream)
    for stage in ("edit", "attack"):
        result = launch(stage, two)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "attack runs (1 of 2 processes)" in result.stderr
    for folder in ("data/attack", "reports/attack", "reports/edit"):
        assert digests(two / folder) == digests(one / folder), folder
    for crt in tiny_params["edit"]["crts"]:  # one CRT per process
        assert digests(two / "data/edit" / crt) == digests(one / "data/edit" / crt)
        assert digests(two / "data/edit" / crt / "unet") == digests(one / "data/edit" / crt / "unet")


HOLD_A_GPU = """
import json, os, sys, time
from pathlib import Path
from pipeline.params import claim_device
device = claim_device()
print(json.dumps(device), flush=True)
while not Path(sys.argv[1]).exists():  # hold the claim until the test says release
    time.sleep(0.05)
"""


def test_stages_running_side_by_side_each_claim_their_own_gpu(tmp_path):
    """Two stage processes take the two GPUs; a third waits until one of them ends, then takes
    the GPU it left (``claim_device``: what lets queue workers share a machine's GPUs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "3,5",
           "TMPDIR": str(tmp_path)}  # the claims live in a scratch folder

    def hold(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", HOLD_A_GPU, str(tmp_path / name)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    first, second = hold("release-first"), hold("release-second")
    first_gpu, second_gpu = (json.loads(p.stdout.readline()) for p in (first, second))
    assert {first_gpu, second_gpu} == {"3", "5"}
    third = hold("release-third")
    time.sleep(3)
    assert third.poll() is None  # both GPUs are held: it waits
    (tmp_path / "release-first").touch()
    first.wait(timeout=30)
    assert json.loads(third.stdout.readline()) == first_gpu  # the GPU the first one left
    for name in ("release-second", "release-third"):
        (tmp_path / name).touch()
    assert second.wait(timeout=30) == 0 and third.wait(timeout=30) == 0
    assert "GPUs 3,5 are all claimed by other stages: waiting for one" in third.stderr.read()


def test_a_launchers_processes_and_a_single_gpu_claim_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}
    claim = [sys.executable, "-c", "from pipeline.params import claim_device; "
             "import os; print(claim_device(), os.environ.get('CUDA_VISIBLE_DEVICES'))"]
    for extra, expected in (({"CUDA_VISIBLE_DEVICES": "3,5", "WORLD_SIZE": "2"}, "None 3,5"),
                            ({"CUDA_VISIBLE_DEVICES": "7"}, "None 7"),
                            ({"CUDA_VISIBLE_DEVICES": "3,5"}, "3 3")):
        out = subprocess.run(claim, env={**env, **extra}, capture_output=True, text=True)
        assert out.stdout.split() == expected.split(), (extra, out.stderr)


TOY_STAGE = """
import json, os, time, yaml
from pipeline.params import claim_device
gpu = claim_device()
start = time.time()
time.sleep(3)
concept = yaml.safe_load(open("params.yaml"))["concept"]
json.dump({"concept": concept, "gpu": gpu, "start": start, "end": time.time()},
          open("metrics.json", "w"))
"""


def test_a_sweep_runs_its_experiments_through_the_queue_a_gpu_each(tmp_path, monkeypatch):
    """``summary --run --jobs 2``'s mechanism on a toy stage: four experiments queued, two
    workers, every experiment recorded; those that ran at the same time had different GPUs."""
    from pipeline.experiments import run_experiments

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stage.py").write_text(TOY_STAGE)
    (repo / "params.yaml").write_text("concept: a\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"toy": {
        "cmd": "python stage.py", "deps": ["stage.py"], "params": ["concept"],
        "metrics": [{"metrics.json": {"cache": False}}]}}}))
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent),
                                                os.environ["PATH"]]))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the stages' GPU claims go in a scratch folder
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [*git, "add", "-A"], [*git, "commit", "-qm", "toy"]):
        subprocess.run(cmd, check=True, capture_output=True)
    run_experiments([["-S", f"concept={c}"] for c in "bcde"], jobs=2)
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    runs = [rev["revs"][0]["data"]["metrics"]["metrics.json"]["data"]
            for entry in shown for rev in entry.get("experiments") or []]
    assert sorted(r["concept"] for r in runs) == list("bcde")
    overlapping = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]
                   if a["start"] < b["end"] and b["start"] < a["end"]]
    assert overlapping  # two workers ran at once
    assert all(a["gpu"] != b["gpu"] and {a["gpu"], b["gpu"]} == {"0", "1"}
               for a, b in overlapping)
