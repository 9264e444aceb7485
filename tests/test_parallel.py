"""Data-parallel stages: the outputs are byte-identical for 1 and 2 processes (two CPU
processes under ``torchrun``, gloo: ``accelerate launch`` needs MPI for CPU processes), and an
interrupted parallel run resumes."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from stages import make_stage_dir, stage_command

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
