"""Puts the repository's top-level `weights/` and `data/` inside the wheel, as `moecli/_bundled/`.

Everything else about the package is in pyproject.toml; this file only adds one build step.
`weights/bardmoe` (the bundled model) and `data/shakespeare.tar.xz` (its training corpus) stay
at the top of the repository, the layout the model card describes, and a clone or an editable
install (`pip install -e .`) reads them there. A wheel has no "top of the repository", so
`pip install .`, `pip install <wheel>` and `pipx install .` get a copy inside the package;
`moecli.hub.bundled` looks in both places.
"""
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


setup(cmdclass={"build_py": build_py_with_bundled_files})
