"""Where the model that ships with moecli lives (`weights/` at the top of the repository)."""
from __future__ import annotations

import sys
from pathlib import Path

from moecli import env
from moecli.errors import ConfigError

BUNDLED_NAME = "bardmoe"


def bundled_model() -> Path:
    """The bundled checkpoint folder: $MOECLI_MODEL, else the repository's weights/ (editable
    installs and clones), else the copy `pip install .` puts under <prefix>/share/moecli."""
    if env.path("MOECLI_MODEL"):
        return env.path("MOECLI_MODEL")
    for root in (Path(__file__).resolve().parents[2], Path(sys.prefix) / "share" / "moecli"):
        folder = root / "weights" / BUNDLED_NAME
        if (folder / "config.json").is_file():
            return folder
    raise ConfigError("the bundled model is not installed",
                      "pass --model PATH_OR_REPO, or reinstall moecli from its repository")
