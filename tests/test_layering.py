"""The import rules the architecture rests on, read off the source: data flows one way, the reference never imports
the kernels nor the kernels the reference, and the cache holds no math."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ["__init__", "_bf16", "_launch", "_rotary", "_tables", "encode", "decode", "aot"]


def imported(path: Path) -> set[str]:
    """Dotted names of the hf_scd modules a file imports, relative imports resolved against its package."""
    package = "hf_scd.kernels" if path.parent.name == "kernels" else ".".join(path.relative_to(REPO).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("hf_scd")}


def test_only_the_backend_imports_the_kernels():
    kernels = REPO / "hf_scd" / "kernels"
    importers = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "hf_scd").rglob("*.py")
        if kernels not in path.parents and any(name.startswith("hf_scd.kernels") for name in imported(path))
    }
    assert importers == {"hf_scd/backend.py"}


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernels_depend_on_the_code_format_not_the_reference(module):
    assert "hf_scd.codec" not in imported(REPO / "hf_scd" / "kernels" / f"{module}.py")


def test_the_cache_is_a_container():
    """cache.py delegates: no codec math, no coders, no patch layers; the plan does that."""
    names = imported(REPO / "hf_scd" / "cache.py")
    assert not names & {"hf_scd.codec", "hf_scd.codes", "hf_scd.patch", "hf_scd.backend"}
