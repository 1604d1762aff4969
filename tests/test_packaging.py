"""Packaging: `import gmpo` is pure torch, the TRL classes load lazily, each engine adapter imports only its engine.

Imports are checked in fresh interpreters (this process has TRL loaded already); "without TRL" is simulated by
`sys.modules["trl"] = None`, which makes every `import trl` raise ModuleNotFoundError as a missing package does.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_TRL = "import sys\nsys.modules['trl'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_import_gmpo_loads_no_trl_or_transformers():
    result = run_python(
        "import sys, gmpo\nfrom gmpo import gmpo_objective, GMPOStats\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'trl', 'transformers', 'accelerate', 'datasets'}))"
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_trl_classes_import_as_before():
    result = run_python(
        "from gmpo import GMPOConfig, GMPOTrainer\nimport gmpo.config, gmpo.trainer, trl\n"
        "print(GMPOConfig is gmpo.config.GMPOConfig, GMPOTrainer is gmpo.trainer.GMPOTrainer,"
        " issubclass(GMPOTrainer, trl.GRPOTrainer), 'GMPOTrainer' in dir(gmpo))"
    )
    assert result.stdout.split() == ["True"] * 4, result.stderr


def test_without_trl_the_classes_name_the_extra_in_one_line():
    result = run_python(NO_TRL + "from gmpo import GMPOConfig")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: gmpo.GMPOConfig needs the 'trl' extra (module 'trl' is not installed): "
        "pip install -e '.[trl]'"
    ), result.stderr
    objective = run_python(NO_TRL + "import gmpo\nfrom gmpo import gmpo_objective\nprint('ok')")
    assert objective.stdout.strip() == "ok", objective.stderr


def test_without_trl_the_command_exits_2_with_one_line():
    result = run_python(NO_TRL + "from gmpo.cli import main\nsys.exit(main(['train']))")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "gmpo train: error: `gmpo train` needs the 'trl' extra (module 'trl' is not installed): "
        "pip install -e '.[trl]'"
    )
    usage = run_python(NO_TRL + "from gmpo.cli import main\nsys.exit(main(['--help']))")
    assert usage.returncode == 0 and "usage: gmpo" in usage.stdout, usage.stderr


def imported_roots(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports as 'gmpo.<module>')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(f"gmpo.{node.module}" if node.level else node.module)
    return names


def test_the_objective_and_the_verl_adapter_import_only_their_engine():
    stdlib = set(sys.stdlib_module_names)
    objective = {n for n in imported_roots(ROOT / "gmpo" / "objective.py") if n.split(".")[0] not in stdlib}
    assert objective == {"torch"}, objective
    adapter = set().union(*(imported_roots(p) for p in (ROOT / "gmpo" / "verl").glob("*.py")))
    foreign = {
        n
        for n in adapter
        if n.split(".")[0] not in stdlib | {"torch", "verl"}
        and n != "gmpo.objective"
        and not n.startswith("gmpo.verl")
    }
    assert not foreign, f"gmpo/verl may import only gmpo.objective, torch and verl: {foreign}"


def test_base_dependencies_are_the_objectives_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.4"]
    extras = project["optional-dependencies"]
    own_extras = {
        name.strip() for r in extras["test"] if r.startswith("gmpo[") for name in r[len("gmpo[") : -1].split(",")
    }
    assert "trl" in own_extras, "the README's `pip install -e .[test]` must keep installing the TRL stack"
    assert "deepspeed" in own_extras, "the README's test command runs tests/test_deepspeed.py: .[test] installs it"
    assert not any(r.startswith(("trl", "transformers")) for r in extras["verl"]), extras["verl"]
    assert project["entry-points"]["verl.plugins"] == {"gmpo": "gmpo.verl"}
