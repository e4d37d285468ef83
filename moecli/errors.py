"""One error hierarchy for everything a user can get wrong.

Every failure moecli expects (a bad checkpoint, a bad flag, a failed download) raises a
subclass of `MoecliError` carrying one line that says what is wrong and, in `hint`, what to do.
The CLI turns these into a single stderr line and a non-zero exit code in one place
(`moecli.cli.app`). Only the top level catches them: the command handler, and the chat REPL,
which reports a failed reply and keeps the conversation.
"""
from __future__ import annotations

def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an exception's message (or of a text), at most `limit`
    characters; an exception with no message gives its type's name. For quoting a library's error
    in one of moecli's one-line messages."""
    text = err if isinstance(err, str) else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ("" if isinstance(err, str) else type(err).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: The fix for a quantized checkpoint, wherever it is detected (config.json or a tensor's dtype).
QUANTIZED_HINT = ("use the model's unquantized float16/bfloat16 release, or one in a format moecli reads: block-FP8, "
                  "MXFP4 (gpt-oss) or compressed-tensors W4A16/W8A16 (not GPTQ, AWQ or bitsandbytes)")


class MoecliError(Exception):
    """Base class: `str(err)` is the problem, `err.hint` the fix (may be empty)."""

    exit_code = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        return f"{self}" + (f" — {self.hint}" if self.hint else "")


class ConfigError(MoecliError):
    """config.json is missing, malformed, or names an unsupported architecture."""


class CheckpointError(MoecliError):
    """A safetensors file or tensor is missing, truncated, corrupt or of the wrong shape."""


class TokenizerError(MoecliError):
    """The checkpoint's tokenizer or chat template cannot be loaded or rendered."""


class DownloadError(MoecliError):
    """The Hub could not deliver the requested repository or revision."""


class UsageError(MoecliError):
    """A flag, argument or chat command has an invalid value."""

    exit_code = 2


class ResourceError(MoecliError):
    """The machine lacks something needed: devices, memory or disk."""
