"""moecli: run Mixture-of-Experts language models from a terminal, on JAX and dm-haiku."""
