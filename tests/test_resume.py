"""Interruption: a run killed after a checkpoint and resumed equals the uninterrupted run; checkpoints hold no pickled
weights and the library loads no pickles."""

import ast
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "resume_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("resume_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(model_dir, output_dir, mode):
    return subprocess.run([sys.executable, str(SCRIPT), model_dir, str(output_dir), mode], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("killed")
    killed = run_script(tiny_model_dir, output_dir, "kill")
    checkpoints = sorted(p.name for p in output_dir.glob("checkpoint-*"))
    resumed = run_script(tiny_model_dir, output_dir, "resume")
    return output_dir, killed, checkpoints, resumed


def test_resumed_run_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, killed_and_resumed):
    script = load_script()
    output_dir, killed, checkpoints_at_kill, resumed = killed_and_resumed
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed: {killed.returncode}\n{killed.stderr[-2000:]}"
    assert checkpoints_at_kill == ["checkpoint-2", "checkpoint-4"], "the kill came before or long after checkpoint-4"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_weights = load_file(output_dir / "final" / "model.safetensors")
    report = json.loads((output_dir / "resumed.json").read_text())
    assert report["trained_steps"] == list(range(script.KILL_AT + 1, script.MAX_STEPS + 1)), "did not resume"

    reference = script.make_trainer(tiny_model_dir, str(tmp_path))
    reference.train()
    at_kill = load_file(output_dir / f"checkpoint-{script.KILL_AT}" / "model.safetensors")
    # Tolerance: none, bit for bit. The checkpoint restores the fp32 weights (safetensors), the optimizer and scheduler
    # states and every RNG, the resume point is a generation boundary, and CPU kernels are deterministic for the same
    # shapes and thread count; so any difference means some state was lost or the rollout was regenerated.
    moved = False
    for name, param in reference.model.named_parameters():
        expected = param.detach()
        assert torch.equal(resumed_weights[name], expected), f"{name} differs after resuming"
        moved |= not torch.equal(at_kill[name], expected)
    assert moved, "no weight moved after the resume point: equal final weights would prove nothing"

    reference_steps = {log["step"]: log for log in reference.state.log_history if "loss" in log}
    resumed_steps = {log["step"]: log for log in report["log_history"] if "loss" in log}
    assert sorted(resumed_steps) == list(range(1, script.MAX_STEPS + 1))
    for step in range(script.KILL_AT + 1, script.MAX_STEPS + 1):
        expected = {k: v for k, v in reference_steps[step].items() if k != "step_time"}  # wall-clock time
        got = {k: v for k, v in resumed_steps[step].items() if k != "step_time"}
        assert got == expected, f"step {step} logged different metrics after the resume"
        assert "gmpo/log_ratio_max" in got and "clip_ratio/region_mean" in got


def test_checkpoints_are_safetensors(killed_and_resumed):
    output_dir = killed_and_resumed[0]
    checkpoints = list(output_dir.glob("checkpoint-*")) + [output_dir / "final"]
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert "model.safetensors" in names, f"{checkpoint.name}: no model.safetensors in {sorted(names)}"
        assert not names & {"pytorch_model.bin", "adapter_model.bin"}, f"{checkpoint.name} holds pickled weights"


UNSAFE_LOADS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"),
                ("yaml", "full_load"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
                ("cloudpickle", "loads"), ("marshal", "loads"), ("joblib", "load")}


def unsafe_loads(source: str) -> list[str]:
    """Calls of module.function pairs in UNSAFE_LOADS, and imports of those functions by name, in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            if (node.func.value.id, node.func.attr) in UNSAFE_LOADS:
                found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}(...)")
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if (node.module.split(".")[0], alias.name) in UNSAFE_LOADS:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    return found


def test_the_unsafe_load_check_detects_what_it_looks_for():
    source = "import torch, yaml\nfrom pickle import loads\nx = torch.load('a')\ny = yaml.load(s)\nz = yaml.safe_load(s)\n"
    assert unsafe_loads(source) == ["line 2: from pickle import loads", "line 3: torch.load(...)",
                                    "line 4: yaml.load(...)"]


def test_library_loads_no_pickles():
    sources = sorted((ROOT / "gmpo").rglob("*.py"))
    assert len(sources) > 5
    found = {str(path.relative_to(ROOT)): unsafe_loads(path.read_text()) for path in sources}
    assert not {path: calls for path, calls in found.items() if calls}, "unpickling / unsafe YAML in the library"
