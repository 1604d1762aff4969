"""Packaging: `import gmpo` is pure torch, the TRL classes load lazily, each engine adapter imports only its engine.

Imports are checked in fresh interpreters (this process has TRL loaded already); "without TRL" is simulated by
`sys.modules["trl"] = None`, which makes every `import trl` raise ModuleNotFoundError as a missing package does.
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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
        "from gmpo import GMPOConfig, GMPOTrainer\nimport gmpo.trl.config, gmpo.trl.trainer, trl\n"
        "print(GMPOConfig is gmpo.trl.config.GMPOConfig, GMPOTrainer is gmpo.trl.trainer.GMPOTrainer,"
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


# What each part of the package may import besides the standard library and its own modules (vLLM is TRL's generation
# engine). The objective is the only module both adapters share; neither adapter imports the other, the CLI or the built-in tasks.
ALLOWED_IMPORTS = {
    "objective.py": {"torch"},
    "trl": {"torch", "trl", "transformers", "accelerate", "safetensors", "deepspeed", "vllm", "gmpo.objective"},
    "verl": {"torch", "verl", "gmpo.objective"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("part", sorted(ALLOWED_IMPORTS))
def test_each_part_imports_only_the_objective_and_its_own_engine(part):
    files = [ROOT / "gmpo" / part] if part.endswith(".py") else sorted((ROOT / "gmpo" / part).glob("*.py"))
    own = module_name(files[0]) if part.endswith(".py") else f"gmpo.{part}"
    allowed = ALLOWED_IMPORTS[part]
    foreign = {
        name
        for name in set().union(*map(imported_roots, files))
        if name.split(".")[0] not in sys.stdlib_module_names
        and name.split(".")[0] not in allowed
        and name not in allowed
        and name != own
        and not name.startswith(own + ".")
    }
    assert not foreign, f"gmpo/{part} may import only {sorted(allowed)} and its own modules: {sorted(foreign)}"


def test_the_package_has_no_import_cycle():
    """Edges: every import in a module of gmpo (function-level ones too) of another module of gmpo."""
    modules = {module_name(path): path for path in (ROOT / "gmpo").rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                source = ".".join(filter(None, [base, node.module]))
                targets |= {f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names}
        edges[name] = targets & set(modules) - {name}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for target in sorted(edges[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(modules):
        visit(name)


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
