"""The dtypes moecli meets, in one table: the float dtypes it computes and stores weights in, and
every dtype a safetensors header may name (for messages about the ones it cannot load)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

#: The float dtypes weights can be loaded as, exported in, and read from a checkpoint, by name.
FLOATS: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}

#: Every dtype code of the safetensors format, with the name moecli's messages use.
SAFETENSORS_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}

#: The safetensors codes moecli reads as weights, and their numpy dtypes.
SAFETENSORS_FLOATS: dict[str, np.dtype] = {code: FLOATS[name] for code, name in SAFETENSORS_NAMES.items()
                                           if name in FLOATS}
