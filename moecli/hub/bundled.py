"""Where the files that ship with moecli live: the bundled model and its training corpus.

In the repository they sit at the top level, `weights/bardmoe/` and `data/shakespeare.tar.xz`
(the layout the model card describes), and a clone or an editable install (`pip install -e .`)
reads them there. A wheel (`pip install .`, `pipx install .`) carries a copy inside the package,
`moecli/_bundled/weights/...` and `moecli/_bundled/data/...`, which setup.py puts there.
"""
from __future__ import annotations

from pathlib import Path

from moecli import env
from moecli.errors import ConfigError

BUNDLED_NAME = "bardmoe"
PACKAGE = Path(__file__).resolve().parents[1]  # the moecli/ folder
CHECKOUT = PACKAGE.parent                      # the repository, when moecli runs from one
INSTALLED = PACKAGE / "_bundled"               # the copy inside an installed wheel


def bundled_file(relative: str) -> Path:
    """The shipped file or folder `relative` ("weights/bardmoe", "data/shakespeare.tar.xz"): the
    repository's, when moecli runs from a checkout, else the installed package's copy. When
    neither exists, the path where it belongs (for the error message)."""
    candidates = [INSTALLED / relative]
    if (CHECKOUT / "pyproject.toml").is_file():  # a checkout, not site-packages
        candidates.insert(0, CHECKOUT / relative)
    return next((path for path in candidates if path.exists()), candidates[0])


def bundled_model() -> Path:
    """The checkpoint folder used when no --model is given: $MOECLI_MODEL, else the bundled model."""
    if env.path("MOECLI_MODEL"):
        return env.path("MOECLI_MODEL")
    folder = bundled_file(f"weights/{BUNDLED_NAME}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"the bundled model is not installed ({folder} has no config.json)",
                          "pass --model PATH_OR_REPO, or reinstall moecli from its repository")
    return folder
