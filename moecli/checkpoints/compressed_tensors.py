"""The compressed-tensors checkpoint format: integer weights with group scales, read and written.

What: compressed-tensors (the format of llm-compressor and vLLM; `quant_method:
"compressed-tensors"` in config.json) stores each quantized Linear weight w [out, in] as small
integers q and float scales s, with w ~= (q - z) * s. The `quantization_config` block says
which Linears (`config_groups[*].targets`, minus `ignore`: exact module names or "re:" regexes,
typically the LM head and the MoE routers) and how (`weights`: num_bits, symmetric, strategy).

Why group scales: one scale per row is spoiled by the row's largest weight; a scale for every
`group_size` consecutive inputs (strategy "group", e.g. 32 or 128) follows the local magnitude, so
one outlier costs resolution in its own group only. Strategy "channel" is one scale per output row.

The tensors of one Linear `prefix` (stored torch-style, [out, in]):
    pack-quantized (int4 W4A16, and int8 W8A16 as the library writes it today):
        prefix.weight_packed  int32 [out, ceil(in * bits / 32)]: 32 // bits values per word,
                              value j of a word in bits [bits*j, bits*(j+1)), stored as q + 2**(bits-1)
                              (int4: q + 8 in 0..15, the first input column in the lowest nibble)
        prefix.weight_shape   int64 [2] = (out, in), as the packed width rounds `in` up
    naive-quantized / int-quantized:
        prefix.weight         int8 [out, in]
    both:
        prefix.weight_scale   the model's float dtype, [out, in // group_size] ([out, 1] for channel)
        prefix.weight_zero_point (asymmetric only) z: int8 [out, groups], or for pack-quantized
                              packed like the weights but down the output dimension: int32
                              [ceil(out * bits / 32), groups]

Supported: integer weights of 4 or 8 bits, symmetric or asymmetric, strategy group or channel,
weight-only (A16), one scheme per checkpoint. Refused with a ConfigError: activation quantization
(W8A8, W4A8), float weights (FP8, NVFP4, MXFP4), other bit widths, tensor/block strategies,
g_idx activation order, KV-cache quantization, transforms, sparsity, and mixed precision.

The canonical form (what `decode` returns, `encode` and `quantize` take): values int8 [out, in],
scales float32 [out, groups], zero_points int8 [out, groups] or None. numpy only: no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from moecli.dtypes import FLOATS
from moecli.errors import CheckpointError, ConfigError

QUANT_METHOD = "compressed-tensors"
PACKED, NAIVE = "pack-quantized", "naive-quantized"
FORMATS = (PACKED, NAIVE, "int-quantized")  # the last two store the same tensors
STRATEGIES = ("group", "channel")
HINT = ("moecli reads int4/int8 weight-only compressed-tensors checkpoints (W4A16, W8A16); "
        "otherwise use the model's unquantized float16/bfloat16 release")


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint's Linear weights are quantized (see the module doc). `scale_dtype` is the
    dtype `encode` writes scales in (config.json does not record it; `decode` reads any)."""

    bits: int                         # 4 or 8
    group_size: int | None            # inputs per scale; None = one scale per output channel
    symmetric: bool = True            # False: zero points too
    format: str = PACKED
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        object.__setattr__(self, "group_size", None if self.group_size == -1 else self.group_size)
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.bits not in (4, 8) or self.format not in FORMATS or self.scale_dtype not in FLOATS:
            raise ValueError(f"unsupported scheme {self}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")


def _refuse(what: str) -> ConfigError:
    return ConfigError(f"compressed-tensors checkpoint with {what} is not supported", HINT)


def parse_config(hf_config: dict) -> Scheme | None:
    """The Scheme of config.json's compressed-tensors `quantization_config`, or None without one
    (no quantization_config, or another quant_method such as gptq)."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return None
    for key, what in (("kv_cache_scheme", "KV-cache quantization"), ("sparsity_config", "sparsity"),
                      ("transform_config", "transforms (rotations)"), ("moe_sparsity_config", "expert sparsity")):
        if qc.get(key) and not (isinstance(qc[key], dict) and qc[key].get("format") == "dense"):
            raise _refuse(what)
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError("compressed-tensors quantization_config has no config_groups",
                          "the checkpoint's config.json is incomplete; re-download it")
    schemes, targets = set(), []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise _refuse(f"the preset scheme name {name!r} instead of a scheme")
        if group.get("input_activations") or group.get("output_activations"):
            raise _refuse("activation quantization (W8A8-style)")
        if group.get("weights"):
            schemes.add(_weights(group["weights"], group.get("format") or qc.get("format")))
            targets += [t for t in group.get("targets") or [] if t not in targets]
    if len(schemes) != 1:
        raise _refuse(f"{len(schemes)} weight schemes (mixed precision)" if schemes else "no quantized weights")
    ignore = qc.get("ignore") or []
    if not all(isinstance(n, str) for n in [*targets, *ignore]) or not isinstance(ignore, list):
        raise ConfigError("compressed-tensors targets and ignore must be lists of names",
                          "the checkpoint's config.json is malformed")
    return Scheme(*schemes.pop(), targets=tuple(targets), ignore=tuple(ignore))


def _weights(w: dict, fmt) -> tuple[int, int | None, bool, str]:
    """(bits, group_size, symmetric, format) of one group's `weights` arguments."""
    if str(w.get("type", "int")).lower() != "int":
        raise _refuse(f"{w.get('num_bits')}-bit float weights")
    bits, group_size = w.get("num_bits", 8), w.get("group_size")
    strategy = w.get("strategy") or {None: "tensor", -1: "channel"}.get(group_size, "group")
    if bits not in (4, 8):
        raise _refuse(f"{bits}-bit weights")
    if strategy not in STRATEGIES:
        raise _refuse(f"the {strategy!r} weight strategy")
    if fmt not in FORMATS:
        raise _refuse(f"the {fmt!r} format")
    if w.get("dynamic") or w.get("block_structure") or str(w.get("actorder")).lower() in ("group", "dynamic"):
        raise _refuse("dynamic, block or activation-ordered (g_idx) weights")
    if strategy == "group" and (not isinstance(group_size, int) or group_size <= 0):
        raise ConfigError(f"compressed-tensors group strategy needs a positive group_size, got {group_size!r}",
                          "the checkpoint's config.json is malformed")
    return bits, group_size if strategy == "group" else None, bool(w.get("symmetric", True)), fmt


def _matches(name: str, pattern: str) -> bool:
    """The library's name match: "re:<regex>" with re.match (anchored at the start only), else equality."""
    return re.match(pattern[3:], name) is not None if pattern.startswith("re:") else pattern == name


def is_quantized(name: str, scheme: Scheme) -> bool:
    """Whether the Linear module `name` (e.g. "model.layers.0.mlp.down_proj") is stored quantized:
    a target matches it (the class name "Linear" matches every Linear) and no ignore entry does."""
    return (any(t == "Linear" or _matches(name, t) for t in scheme.targets)
            and not any(_matches(name, p) for p in scheme.ignore))


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """int8 [rows, n] -> int32 [rows, ceil(n * bits / 32)], value j of each word at bit bits*j, as
    value + 2**(bits-1); the last word's unused slots are 0 (the library's pack_to_int32)."""
    per = 32 // bits
    rows, n = values.shape
    words = np.zeros((rows, -(-n // per) * per), np.uint32)
    words[:, :n] = values.astype(np.int32) + (1 << (bits - 1))
    shifted = words.reshape(rows, -1, per) << (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(shifted, axis=-1).view(np.int32)


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The inverse of _pack: int32 [rows, words] -> int8 [rows, n]."""
    per = 32 // bits
    words = np.ascontiguousarray(packed).view(np.uint32)[..., None]
    fields = (words >> (np.arange(per, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    return (fields.reshape(packed.shape[0], -1)[:, :n].astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def _tensor(tensors: dict, key: str, kinds: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """tensors[key], checked: its dtype kind is one of `kinds` ("i" int, "f" float) and its shape is `shape`."""
    if key not in tensors:
        raise CheckpointError(f"quantized tensor {key} is missing", "the checkpoint is incomplete; re-download it")
    t = np.asarray(tensors[key])
    kind = "f" if t.dtype.kind == "f" or t.dtype == ml_dtypes.bfloat16 else t.dtype.kind
    if kind not in kinds or (shape is not None and t.shape != shape):
        wanted = f"shape {list(shape)}" if shape else "an integer tensor" if "i" in kinds else "floats"
        raise CheckpointError(f"quantized tensor {key} is {t.dtype} {list(t.shape)}, expected {wanted}",
                              "the checkpoint does not match its quantization_config")
    return t


def _groups(d_in: int, group_size: int | None) -> int:
    """Scales per row: d_in / group_size, or 1 per output channel (group_size None or -1)."""
    if group_size in (None, -1):
        return 1
    if group_size <= 0 or d_in % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input size {d_in}")
    return d_in // group_size


def decode(tensors: dict[str, np.ndarray], prefix: str, scheme: Scheme):
    """The canonical (values, scales, zero_points | None) of the Linear `prefix` from its stored tensors."""
    bits = scheme.bits
    if scheme.format == PACKED:
        shape = _tensor(tensors, f"{prefix}.weight_shape", "iu", (2,))
        out, d_in = (int(s) for s in shape)
        packed = _tensor(tensors, f"{prefix}.weight_packed", "i", (out, -(-d_in * bits // 32)))
        if packed.dtype != np.int32:
            raise CheckpointError(f"{prefix}.weight_packed is {packed.dtype}, not int32", "re-download the checkpoint")
        values = _unpack(packed, bits, d_in)
    else:
        values = _tensor(tensors, f"{prefix}.weight", "i")
        if values.ndim != 2 or values.dtype != np.int8:
            raise CheckpointError(f"{prefix}.weight is {values.dtype} {list(values.shape)}, not a 2-D int8 matrix",
                                  "the checkpoint does not match its quantization_config")
        out, d_in = values.shape
    try:
        groups = _groups(d_in, scheme.group_size)
    except ValueError as err:
        raise CheckpointError(f"{prefix}: {err}", "the checkpoint does not match its quantization_config") from None
    scales = _tensor(tensors, f"{prefix}.weight_scale", "f")
    if scales.size != out * groups:
        _tensor(tensors, f"{prefix}.weight_scale", "f", (out, groups))  # raises, naming the expected shape
    scales = scales.astype(np.float32).reshape(out, groups)
    if scheme.symmetric:
        return values, scales, None
    zp = _tensor(tensors, f"{prefix}.weight_zero_point", "i")
    if scheme.format == PACKED and not (zp.dtype == np.int8 and zp.shape == (out, groups)):  # else: stored unpacked
        zp = _tensor(tensors, f"{prefix}.weight_zero_point", "i", (-(-out * bits // 32), groups))
        return values, scales, _unpack(zp.astype(np.int32).T, bits, out).T.copy()
    zp = _tensor(tensors, f"{prefix}.weight_zero_point", "i", (out, groups))
    return values, scales, zp.astype(np.int8)


def encode(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
           scheme: Scheme) -> dict[str, np.ndarray]:
    """The tensors the library writes for one Linear, by suffix ("weight_packed", ...), from the canonical form."""
    values = np.asarray(values)
    lo, hi = -(1 << (scheme.bits - 1)), (1 << (scheme.bits - 1)) - 1
    if values.ndim != 2 or values.dtype != np.int8 or values.min(initial=0) < lo or values.max(initial=0) > hi:
        raise ValueError(f"values must be a 2-D int8 matrix in {lo}..{hi}")
    out, d_in = values.shape
    groups = _groups(d_in, scheme.group_size)
    if np.shape(scales) != (out, groups) or (zero_points is None) != scheme.symmetric:
        raise ValueError(f"scales must be [{out}, {groups}], with zero points exactly when asymmetric")
    stored = {"weight_scale": np.asarray(scales, np.float32).astype(FLOATS[scheme.scale_dtype])}
    if scheme.format == PACKED:
        stored.update(weight_packed=_pack(values, scheme.bits), weight_shape=np.array([out, d_in], np.int64))
    else:
        stored["weight"] = values.copy()
    if zero_points is not None:
        zp = np.asarray(zero_points, np.int8)
        stored["weight_zero_point"] = _pack(zp.T, scheme.bits).T.copy() if scheme.format == PACKED else zp.copy()
    return stored


def dequantize(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None) -> np.ndarray:
    """The float32 matrix [out, in] the canonical form stands for: (values - zero_points) * scales, each
    scale and zero point covering its group of in // groups consecutive inputs."""
    out, d_in = values.shape
    q = values.astype(np.float32).reshape(out, scales.shape[1], -1)
    if zero_points is not None:
        q -= zero_points.astype(np.float32)[..., None]
    return (q * scales.astype(np.float32)[..., None]).reshape(out, d_in)


def config_for(scheme: Scheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for checkpoints `encode` writes: the block the library's
    ModelCompressor writes (without its "version"), with `ignore` (module names or "re:" regexes)."""
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
               "group_size": scheme.group_size, "strategy": "group" if scheme.group_size else "channel",
               "dynamic": False}
    return {"quant_method": QUANT_METHOD, "format": scheme.format, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": list(scheme.targets), "weights": weights,
                                          "input_activations": None, "output_activations": None,
                                          "format": scheme.format}},
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "moe_sparsity_config": None, "sparsity_config": {}, "transform_config": {}}


def quantize(w: np.ndarray, bits: int, group_size: int | None, symmetric: bool = True):
    """Round w [out, in] to nearest, per group of `group_size` inputs (None/-1: per row), as the
    library's min-max calibration does (`calculate_qparams` then `quantize`), in w's own float dtype
    (so bfloat16 weights give what the library gives a bfloat16 model). Returns canonical
    (values, scales float32, zero_points | None).

    The library's grid is the full two's-complement range -2**(b-1)..2**(b-1)-1, with symmetric
    scale max|w| / (qmax + 0.5) (7.5 for int4, 127.5 for int8): the largest positive weight lands on
    qmax + 0.5 and is clipped half a step, the most negative on -2**(b-1). (moecli.model.quant instead
    uses max|w| / qmax and never produces -2**(b-1).) Asymmetric: scale (max - min) / (2**b - 1) with
    min <= 0 <= max, zero point round(qmin - min / scale). A group of zeros gets the scale eps of
    the dtype, as in the library, and zero point 0 (what the library's 0 / 0 casts to)."""
    w = np.asarray(w)
    if not (w.dtype.kind == "f" or w.dtype == ml_dtypes.bfloat16):
        w = w.astype(np.float32)
    if w.ndim != 2 or bits not in (4, 8):
        raise ValueError(f"quantize takes a 2-D matrix and 4 or 8 bits, got shape {w.shape}, {bits} bits")
    dt, (out, d_in) = w.dtype.type, w.shape
    groups = _groups(d_in, group_size)
    g = w.reshape(out, groups, d_in // groups)
    low, high = np.minimum(g.min(-1), dt(0)), np.maximum(g.max(-1), dt(0))
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        scale = np.maximum(-low, high) / dt((qmax - qmin) / 2)
    else:
        scale = (high - low) / dt(qmax - qmin)
    zero = scale == 0
    scale = np.where(zero, dt(ml_dtypes.finfo(w.dtype).eps), scale).astype(w.dtype)
    scaled, zp = g / scale[..., None], None
    if not symmetric:
        zp = np.where(zero, 0, np.rint(np.clip((dt(qmin) - low / scale).astype(np.float32), qmin, qmax)))
        scaled = scaled + zp.astype(w.dtype)[..., None]
    values = np.rint(np.clip(scaled.astype(np.float32), qmin, qmax)).astype(np.int8).reshape(out, d_in)
    return values, scale.astype(np.float32), None if zp is None else zp.astype(np.int8)
