"""Reading safetensors checkpoint files: headers checked before any tensor is read, and tensors
read one at a time.

The format: 8 bytes of header length, a JSON header naming every tensor's dtype, shape and byte
range, then the raw bytes. A file whose size does not match its header exactly is truncated (an
interrupted download) or corrupt, and is never read as if complete.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from moecli.checkpoints.placement import aligned_empty
from moecli.dtypes import FLOATS, SAFETENSORS_FLOATS, SAFETENSORS_NAMES
from moecli.errors import QUANTIZED_HINT, CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header

SAFETENSORS_DTYPES = SAFETENSORS_NAMES
FLOAT_DTYPES = set(FLOATS.values())
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files; every shard the index names must exist."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not shards or not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
                raise TypeError("shard names must be file names in the checkpoint folder")
        except OSError as err:
            raise CheckpointError(f"cannot read {index}: {err.strerror or err}", "check the file's permissions") from None
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index",
                                  "re-download the checkpoint") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} named by {INDEX} is missing from {folder}",
                                  "the download is incomplete; run `moe download` again to resume it")
        return [folder / s for s in shards]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}",
                              "moecli reads safetensors checkpoints only (not .bin, .pt or .gguf)")
    return files


#: The integer codes a quantized checkpoint's tensors use (compressed-tensors: int32 packed words,
#: int8 values and zero points, int64 shapes).
SAFETENSORS_INTS = {"I32": np.dtype(np.int32), "I8": np.dtype(np.int8), "I64": np.dtype(np.int64)}


def extra_dtypes(quantized: bool | Mapping[str, np.dtype]) -> dict[str, np.dtype]:
    """The safetensors codes read besides the floats: none (False), compressed-tensors' integers (True),
    or the codes a format names ({code: numpy dtype}, e.g. `moecli.checkpoints.fp8.STORED`)."""
    return {} if not quantized else dict(SAFETENSORS_INTS) if quantized is True else dict(quantized)


def check_dtypes(path: Path, header: dict, quantized: bool | Mapping[str, np.dtype] = False) -> None:
    """CheckpointError naming the first tensor of a safetensors header that moecli cannot load: a quantized
    one (int8, packed int4, float8, float4, ...) or another non-float (float64, bool). With `quantized`
    (config.json names a format moecli reads, `moecli.checkpoints.compressed_tensors`), integers too, or
    the codes `quantized` maps (`extra_dtypes`)."""
    extra = extra_dtypes(quantized)
    for name, info in header.items():
        dtype = info["dtype"] if name != "__metadata__" else None
        if (dtype is None or dtype in SAFETENSORS_FLOATS or name.endswith(IGNORED_SUFFIXES)
                or dtype in extra):
            continue
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name} in {path.name} has an unknown dtype {dtype[:20]!r}",
                                  "the file is corrupt or newer than this safetensors; re-download it")
        if dtype in ("F64", "BOOL"):
            raise CheckpointError(f"tensor {name} in {path.name} is {SAFETENSORS_DTYPES[dtype]}, which moecli "
                                  "cannot load", "convert the checkpoint to float16, bfloat16 or float32")
        raise CheckpointError(f"tensor {name} in {path.name} is {SAFETENSORS_DTYPES[dtype]}: quantized "
                              "checkpoints are not supported", QUANTIZED_HINT)


def iter_tensors(files: list[Path], quantized: bool | Mapping[str, np.dtype] = False
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every float tensor of every file, one at a time, in file order.

    Every file's header is checked first (complete, well formed, float dtypes only), so a truncated
    shard or a quantized checkpoint fails at once, before minutes of loading the shards before it.
    Tensors are read with plain file reads into fresh arrays rather than through a memory map: the
    pages of a mapped file count towards the process's memory while it stays mapped, which put a
    whole 1 GB shard on top of the loading peak (bf16: 1.36x the checkpoint; 1.3x is the target)."""
    headers = []
    for path in files:
        header, _ = check_safetensors(path)
        check_dtypes(path, header, quantized)
        headers.append(header)
    readable = {**SAFETENSORS_FLOATS, **extra_dtypes(quantized)}

    for path, header in zip(files, headers):
        tensors = sorted(((info["data_offsets"], name, info) for name, info in header.items()
                          if name != "__metadata__" and info["dtype"] in readable), key=lambda t: t[0])
        try:
            with path.open("rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")  # data begins after the header
                for (begin, end), name, info in tensors:
                    shape, dtype = info.get("shape"), readable[info["dtype"]]
                    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
                            and math.prod(shape) * dtype.itemsize == end - begin):
                        raise CheckpointError(f"{path.name} is corrupt (tensor {name}: {end - begin} bytes for shape "
                                              f"{str(shape)[:80]})", "re-download the checkpoint")
                    array = aligned_empty(shape, dtype)  # so a whole tensor reaches the device without a copy
                    f.seek(start + begin)
                    if array.nbytes and f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                        raise CheckpointError(f"{path.name} is truncated", "re-download the checkpoint")
                    yield name, array
        except OSError as err:
            raise CheckpointError(f"cannot read {path.name}: {err.strerror or err}", "check the file's permissions") from None


def incomplete_safetensors(folder: str | Path) -> list[Path]:
    """The *.safetensors files of `folder` that are truncated or corrupt."""
    bad = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            check_safetensors(path)
        except CheckpointError:
            bad.append(path)
    return bad


def check_safetensors(path: Path) -> tuple[dict, int]:
    """(header, expected size) of a safetensors file whose size matches its header exactly; otherwise a
    CheckpointError saying whether it is truncated (an interrupted download) or corrupt."""
    hint = "the download was interrupted; re-run `moe download` to resume it"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name} is truncated ({size} bytes, no header)", hint)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path.name} is not a safetensors file (header length {header_len})",
                                      "download the checkpoint again")
            if 8 + header_len > size:
                raise CheckpointError(f"{path.name} is truncated ({size} bytes, inside its header)", hint)
            header = json.loads(f.read(header_len))
    except OSError as err:
        raise CheckpointError(f"cannot read {path.name}: {err.strerror or err}", "check the file's permissions") from None
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, too many digits, nesting
        raise CheckpointError(f"{path.name} has a corrupt safetensors header", "download the checkpoint again") from None
    try:
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if not all(isinstance(v["dtype"], str) and _offsets_ok(v["data_offsets"]) for v in tensors.values()):
            raise ValueError
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, OverflowError):
        raise CheckpointError(f"{path.name} has a malformed safetensors header",
                              "download the checkpoint again") from None
    expected = 8 + header_len + end
    if size < expected:
        raise CheckpointError(f"{path.name} is truncated ({size} of {expected} bytes)", hint)
    if size > expected:
        raise CheckpointError(f"{path.name} is corrupt ({size} bytes where its header describes {expected})",
                              "download the checkpoint again")
    return header, expected


def _offsets_ok(offsets) -> bool:
    return (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1])
