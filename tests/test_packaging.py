"""The built wheel installs one import package, `hf_scd`, and works installed from it.

The Triton kernels are `hf_scd.kernels`: a top-level `kernels` package would overwrite, or be overwritten by, Hugging
Face's `kernels` package (the Hub kernel loader that transformers 5.25+ depends on and imports at start-up), and a
`kernels/` package folder at the repo root would shadow it for anything run from the checkout.
"""

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the sources (the build writes its scratch folders beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "hf_scd", source / "hf_scd", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source]
    subprocess.run(build, check=True, timeout=300, capture_output=True)
    (path,) = out.glob("hf_scd-*.whl")
    return path


def test_wheel_installs_only_hf_scd(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"hf_scd"}
    assert {"hf_scd/kernels/__init__.py", "hf_scd/kernels/encode.py", "hf_scd/kernels/decode.py"} <= set(names)


def test_installed_wheel_dispatches_to_its_own_kernels_beside_another_kernels_package(wheel, tmp_path):
    """Installed next to a top-level `kernels` package (standing in for Hugging Face's), the codec still finds its
    kernels, and `import kernels` still gives the other package."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, wheel],
        check=True,
        timeout=300,
        capture_output=True,
    )
    other = target / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("def get_kernel(repo_id):\n    return repo_id\n")
    probe = (
        "import kernels, hf_scd.codec, hf_scd.kernels\n"
        "assert kernels.get_kernel('x') == 'x'\n"
        "assert hf_scd.kernels.__file__.startswith(sys.argv[1]), hf_scd.kernels.__file__\n"
        "assert callable(hf_scd.kernels.available)\n"
        "from hf_scd.kernels import _tables\n"
        "print(_tables.BYTE_CHUNK)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", "import sys\n" + probe, str(target)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr


def test_transformers_imports_from_the_checkout_root():
    """`python -m ...` puts the working directory first on sys.path: run from the repo root, nothing there may shadow
    a package transformers imports (it imports Hugging Face's `kernels` at start-up since 5.25)."""
    probe = "import transformers.activations, hf_scd.kernels, kernels; assert 'hf_scd' not in kernels.__name__"
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not (REPO / "kernels" / "__init__.py").exists()
