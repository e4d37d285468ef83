"""moecli: run Mixture-of-Experts language models from a terminal, on JAX and dm-haiku."""
from moecli.engine import Model, load_model
from moecli.generate import generate_tokens

__all__ = ["Model", "load_model", "generate_tokens"]
__version__ = "0.1.0"
