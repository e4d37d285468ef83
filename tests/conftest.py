import os
import sys
from pathlib import Path

# Tests import their helpers (hf_models, tokenizer_fixtures, ...) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
