"""The linear layer every projection uses, computed by the backend's matrix product."""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from moecli.model.ops import Ops


class Linear(hk.Module):
    """y = x @ w (+ b) through `ops.matmul`, with hk.Linear's parameters ("w" [in, out], "b" [out])
    and initialiser, so checkpoints map onto it the same way."""

    def __init__(self, output_size: int, ops: Ops, with_bias: bool = True, name: str | None = None):
        super().__init__(name=name)
        self.output_size, self.ops, self.with_bias = output_size, ops, with_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        w = hk.get_parameter("w", [d_in, self.output_size], x.dtype,
                             init=hk.initializers.TruncatedNormal(1.0 / np.sqrt(d_in)))
        y = self.ops.matmul(x, w)
        if self.with_bias:
            y = y + hk.get_parameter("b", [self.output_size], x.dtype, init=jnp.zeros)
        return y
