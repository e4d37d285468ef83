"""Two build steps pyproject.toml cannot declare: the repository's top-level `weights/` and `data/`
go inside the wheel, as `moecli/_bundled/`, and the CPU kernels are compiled at install time.

Everything else about the package is in pyproject.toml.
`weights/bardmoe` (the bundled model) and `data/shakespeare.tar.xz` (its training corpus) stay
at the top of the repository, the layout the model card describes, and a clone or an editable
install (`pip install -e .`) reads them there. A wheel has no "top of the repository", so
`pip install .`, `pip install <wheel>` and `pipx install .` get a copy inside the package;
`moecli.hub.bundled` looks in both places.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED_FOLDERS = ("weights", "data")


class build_py_with_bundled_files(build_py):
    """build_py whose package data also holds the files of BUNDLED_FOLDERS, under moecli/_bundled/.

    Adding them to `data_files` (what setuptools copies, lists as the build's outputs and links
    for a strict editable install) keeps the one list of files in one place."""

    def _get_data_files(self):
        files = [str(path.relative_to(ROOT)) for folder in BUNDLED_FOLDERS
                 for path in sorted((ROOT / folder).rglob("*"))
                 if path.is_file() and not path.name.startswith(".")]
        target = str(Path(self.build_lib, "moecli", "_bundled"))
        return [*super()._get_data_files(), ("moecli._bundled", str(ROOT), target, files)]



class build_py_with_kernels(build_py_with_bundled_files):
    """Also compiles the CPU kernels (moecli/kernels/cpu/build.py, loaded by path: jax is not in
    pip's build environment, so against the FFI headers vendored in csrc/vendor/) into the package's
    `kernels/cpu/prebuilt/`: the source tree's for an editable install, the wheel's otherwise. Where
    that fails (no compiler), the install goes on and moecli builds them on first use instead."""

    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("moecli_kernel_build", ROOT / "moecli/kernels/cpu/build.py")
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        package = ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib)
        target = package / build.PREBUILT.relative_to(ROOT)
        try:
            library = build.build(target, "native", build.VENDORED_FFI)
            print(f"moecli: built the CPU kernels into {library}")
        except (OSError, RuntimeError) as err:
            print(f"moecli: the CPU kernels were not built at install time ({err}); moecli builds them on "
                  "first use, or runs without them where no C++ compiler exists", file=sys.stderr)


setup(cmdclass={"build_py": build_py_with_kernels})
