"""A non-editable install works on its own: the wheel carries the kernels' C++ headers, the bundled
model and the training corpus, and `moe generate` from it runs offline with the CPU kernels on —
the ones `pip` built at install time, so nothing is compiled on first use.

The checkout's `weights/` and `data/` must not leak in: the wheel is installed into a fresh venv
outside the checkout and run from an empty folder, with a fresh cache and HOME. The venv sees the
environment's site-packages (jax, haiku and the rest are not installed again), so the test also
checks that `moecli` itself is imported from the venv, not from the editable install there.
One wheel build per session; the install-time kernel build is most of the time.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".venv",
                                     ".pytest_cache", "prebuilt")
#: The files a wheel must carry besides the Python modules: {path in the checkout: path in the wheel}.
SHIPPED = {
    **{str(p.relative_to(ROOT)): str(p.relative_to(ROOT))
       for p in sorted((ROOT / "moecli" / "kernels" / "cpu" / "csrc").glob("*.[ch]*"))},
    **{str(p.relative_to(ROOT)): f"moecli/_bundled/{p.relative_to(ROOT)}"
       for folder in ("weights/bardmoe", "data") for p in sorted((ROOT / folder).iterdir()) if p.is_file()},
}


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output (not a bare exit code)."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args[:4]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def outside_env(tmp: Path) -> dict[str, str]:
    """The environment of a user who just installed moecli: no MOECLI_* settings, a fresh cache and
    HOME, no network for the Hub, nothing on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOECLI_", "HF_", "XDG_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(tmp / "home"), MOECLI_CACHE=str(tmp / "cache"), HF_HUB_OFFLINE="1")
    return env


def make_venv(folder: Path) -> Path:
    """A venv that sees the environment's packages; returns its python."""
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder])
    return folder / "bin" / "python"


def pip_into(python: Path, *args) -> None:
    """pip install into another interpreter's venv, ignoring the moecli the environment already has."""
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--ignore-installed",
         "--no-build-isolation", *args])


def ask(python: Path, tmp: Path, code: str) -> list[str]:
    """Run `code` in `python` from an empty folder; its printed lines."""
    cwd = tmp / "cwd"
    cwd.mkdir(exist_ok=True)
    return run([python, "-c", code], cwd=cwd, env=outside_env(tmp)).stdout.splitlines()


WHERE = ("import moecli\nfrom moecli.hub.bundled import bundled_model\n"
         "from moecli.training.data import BUNDLED_ARCHIVE, read_works\n"
         "print(moecli.__file__); print(bundled_model()); print(BUNDLED_ARCHIVE); print(len(read_works()))")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout: building writes build/ and *.egg-info next to the sources, and the
    copy keeps them out of the working tree."""
    folder = tmp_path_factory.mktemp("checkout") / "moecli"
    shutil.copytree(ROOT, folder, ignore=NOT_SOURCES)
    return folder


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source])
    (built,) = dist.glob("moecli-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(the venv's python, a scratch folder) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("installed")
    python = make_venv(tmp / "venv")
    pip_into(python, wheel)
    return python, tmp


def test_the_wheel_ships_the_headers_the_model_and_the_corpus(wheel):
    assert any(path.endswith(".h") for path in SHIPPED) and "weights/bardmoe/model.safetensors" in SHIPPED
    with zipfile.ZipFile(wheel) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    for checkout_path, wheel_path in SHIPPED.items():
        assert wheel_path in sizes, f"{checkout_path} is not in the wheel"
        assert sizes[wheel_path] == (ROOT / checkout_path).stat().st_size, wheel_path
    assert not [name for name in sizes if name.startswith(("tests/", "bench/", "weights/", "data/"))]


def test_the_installed_package_finds_its_own_model_and_corpus(installed):
    python, tmp = installed
    package = python.parent.parent / "lib"
    module, model, archive, works = ask(python, tmp, WHERE)
    for path in (module, model, archive):
        assert Path(path).is_relative_to(package), f"{path} is not inside the venv"
    assert Path(model).name == "bardmoe" and Path(archive).name == "shakespeare.tar.xz"
    assert int(works) == 41


@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")),
                    reason="the CPU kernels need a C++ compiler")
def test_moe_generate_from_the_wheel_runs_offline_with_the_cpu_kernels(installed):
    python, tmp = installed
    result = run([python.parent / "moe", "generate", "--prompt", "Good morrow", "--max-tokens", "8",
                  "--temperature", "0", "--verbose"], cwd=tmp / "cwd", env=outside_env(tmp))
    assert result.stdout.strip(), result.stderr
    assert "CPU kernels: on" in result.stderr, result.stderr
    assert not list((tmp / "cache").glob("kernels/*.so")), "the kernels were built on first use, not at install time"


@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")),
                    reason="the CPU kernels need a C++ compiler")
def test_the_wheel_carries_kernels_built_at_install_time(wheel):
    with zipfile.ZipFile(wheel) as archive:
        built = [n for n in archive.namelist() if n.startswith("moecli/kernels/cpu/prebuilt/cpu_kernels-native-")]
    assert len(built) == 1 and built[0].endswith(".so")


def test_an_editable_install_reads_the_checkouts_model_and_corpus(source, tmp_path):
    python = make_venv(tmp_path / "venv")
    pip_into(python, "-e", source)
    module, model, archive, works = ask(python, tmp_path, WHERE)
    checkout = source.resolve()
    assert Path(module).resolve() == checkout / "moecli" / "__init__.py"
    assert Path(model).resolve() == checkout / "weights" / "bardmoe"
    assert Path(archive).resolve() == checkout / "data" / "shakespeare.tar.xz"
    assert int(works) == 41
    if os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"):  # built into the checkout's package
        assert list((checkout / "moecli" / "kernels" / "cpu" / "prebuilt").glob("cpu_kernels-native-*.so"))
