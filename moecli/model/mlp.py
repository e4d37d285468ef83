"""The dense feed-forward block: SwiGLU."""
from __future__ import annotations

import haiku as hk
import jax

from moecli.model.linear import Linear
from moecli.model.ops import Ops


class MLP(hk.Module):
    """SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"):
    down(silu(gate(x)) * up(x)). Used for dense layers and for shared experts; `bias`: each projection
    has one (ERNIE-4.5's use_bias)."""

    def __init__(self, d_model: int, d_hidden: int, ops: Ops, quant=None, name: str = "mlp", bias: bool = False):
        super().__init__(name=name)
        self.d_model, self.d_hidden, self.ops, self.quant, self.bias = d_model, d_hidden, ops, quant, bias

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Linear(self.d_hidden, self.ops, with_bias=self.bias, quant=self.quant, name="gate_proj")(x)
        up = Linear(self.d_hidden, self.ops, with_bias=self.bias, quant=self.quant, name="up_proj")(x)
        return Linear(self.d_model, self.ops, with_bias=self.bias, quant=self.quant, name="down_proj")(
            jax.nn.silu(gate) * up)
