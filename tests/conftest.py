import os
import sys
import tempfile
from pathlib import Path

# Tests import their helpers (hf_models, tokenizer_fixtures, ...) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests never write into the user's own ~/.cache/moecli: compiled kernels and programs, chat
# history and bench checkpoints go to a folder of their own, kept between runs (CI sets its own).
os.environ.setdefault("MOECLI_CACHE", str(Path(tempfile.gettempdir()) / f"moecli-tests-{os.getuid()}"))
