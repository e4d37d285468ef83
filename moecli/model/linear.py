"""The linear layer every projection uses, computed by the backend's matrix product."""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from moecli.model.ops import Ops
from moecli.model.quant import get_weight


class Linear(hk.Module):
    """y = x @ w (+ b) through `ops.matmul`, with hk.Linear's parameters ("w" [in, out], "b" [out])
    and initialiser, so checkpoints map onto it the same way. With `quant` (a QuantConfig), "w" may be a
    quantized weight (`moecli.model.quant`), which `ops.matmul` takes as it is."""

    def __init__(self, output_size: int, ops: Ops, with_bias: bool = True, quant=None,
                 name: str | None = None):
        super().__init__(name=name)
        self.output_size, self.ops, self.with_bias, self.quant = output_size, ops, with_bias, quant

    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        w = get_weight("w", [d_in, self.output_size], x.dtype,
                       hk.initializers.TruncatedNormal(1.0 / np.sqrt(d_in)), self.quant)
        y = self.ops.matmul(x, w)
        if self.with_bias:
            y = y + hk.get_parameter("b", [self.output_size], x.dtype, init=jnp.zeros)
        return y
