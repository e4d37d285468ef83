"""Getting checkpoints from the Hugging Face Hub, and checking a checkpoint folder before use.

`download` fetches only what inference needs (`INFERENCE_FILES`: config, safetensors weights,
tokenizer and chat template; never .bin/.pt/.gguf duplicates) with `huggingface_hub.snapshot_download`,
into the standard Hugging Face cache (or `local_dir`), honouring HF_TOKEN, HF_HOME, HF_ENDPOINT
and HF_HUB_OFFLINE exactly as huggingface_hub does. Every failure huggingface_hub can raise is
turned into one `DownloadError` / `ResourceError` line with a hint. An interrupted transfer is
retried with HTTP Range requests by huggingface_hub itself; files completed before a failure stay
in the cache, so running the same command again fetches only what is missing.

`resolve_model` turns a CLI argument (a folder or a repo id) into a folder, `validate_checkpoint`
checks that folder (supported architecture, every shard present and complete) and summarises it,
and `summary_table` renders that summary for the terminal. The progress bars live in `moecli.hub.progress`.
"""
from __future__ import annotations

import contextlib
import errno
from pathlib import Path


from moecli.errors import DownloadError, MoecliError, ResourceError, UsageError, first_line
from moecli.checkpoints.safetensors import incomplete_safetensors
from moecli.checkpoints.summary import CheckpointSummary, summary_table, validate_checkpoint
from moecli.hub.progress import _bar_class, _bars_disabled, _Progress, _quiet_hub_logs, human_bytes, human_count

#: `allow_patterns` / `ignore_patterns` for `snapshot_download`: what inference reads, nothing else.
INFERENCE_FILES: dict[str, list[str]] = {
    "allow_patterns": [
        "config.json",
        "generation_config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    ],
    "ignore_patterns": ["*.bin", "*.pt", "*.pth", "*.gguf", "original/*", "*.msgpack", "*.h5", "*.onnx"],
}

AUTH_HINT = "set HF_TOKEN (or use `moe download REPO --token T`); accept the licence on the model page"
RESUME_HINT = "run the same command again to resume (finished files are kept)"
OFFLINE_HINT = "connect to the network or unset HF_HUB_OFFLINE"
# ----------------------------------------------------------------------------------------------
# download


def download(repo_id: str, revision: str | None = None, local_dir: str | Path | None = None,
             token: str | None = None, progress: bool = True) -> Path:
    """Fetch the inference files of `repo_id` at `revision`; returns the folder that holds them.

    Without `local_dir` the files go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE) and the
    returned folder is the cached snapshot. Raises `DownloadError` (or `ResourceError` for a full
    disk, `UsageError` for a malformed repo id); never a huggingface_hub or httpx exception.
    """
    folder = _snapshot(repo_id, revision, local_dir, token, progress)
    damaged = incomplete_safetensors(folder)
    if damaged:  # a truncated file from an earlier run: huggingface_hub would keep it, so drop it and fetch again
        for path in damaged:
            _remove_with_blob(path)
        folder = _snapshot(repo_id, revision, local_dir, token, progress)
        damaged = incomplete_safetensors(folder)
        if damaged:
            raise DownloadError(f"{damaged[0].name} of {repo_id} is still incomplete after downloading it again",
                                "the file on the Hub may be damaged; try another revision")
    return folder


def resolve_model(name_or_path: str | Path, revision: str | None = None, token: str | None = None,
                  offline: bool | None = None) -> Path:
    """The checkpoint folder for a CLI argument: a local folder as is, else a Hub repo id, taken from
    the Hugging Face cache when it is there and downloaded otherwise (never when `offline`, which
    defaults to HF_HUB_OFFLINE)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{name_or_path} is a file, not a checkpoint folder",
                         "pass a checkpoint directory or a Hub repo id such as mistralai/Mixtral-8x7B-v0.1")
    repo_id = str(name_or_path)
    if offline is None:
        offline = _hf().constants.is_offline_mode()
    snapshot_download = _hf().snapshot_download
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token or None,
                                      local_files_only=True, **INFERENCE_FILES))
    except Exception as err:  # noqa: BLE001 - anything but "not cached" is mapped to a one-line error
        if not isinstance(err, _hf_error("LocalEntryNotFoundError", FileNotFoundError)):
            mapped = _map_error(err, repo_id, revision, token, None)
            if mapped is None:
                raise
            raise mapped from None
        if offline:
            incomplete = isinstance(err, _hf_error("IncompleteSnapshotError", ()))
            what = "only partly in the local cache" if incomplete else "not in the local cache"
            hint = OFFLINE_HINT if _hf().constants.is_offline_mode() else f"run `moe download {repo_id}` online first"
            raise DownloadError(f"{repo_id} is {what} and offline mode is on", hint) from None
    return download(repo_id, revision=revision, token=token)


def _snapshot(repo_id, revision, local_dir, token, progress) -> Path:
    hf = _hf()
    bars = _Progress(repo_id) if progress and not _bars_disabled() else None
    try:
        with bars or contextlib.nullcontext(), _quiet_hub_logs():
            path = hf.snapshot_download(
                repo_id, revision=revision, local_dir=str(local_dir) if local_dir is not None else None,
                token=token or None, tqdm_class=_bar_class(bars),
                etag_timeout=hf.constants.HF_HUB_ETAG_TIMEOUT, **INFERENCE_FILES)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line; bugs are re-raised below
        mapped = _map_error(err, repo_id, revision, token, local_dir)
        if mapped is None:
            raise
        raise mapped from None
    return Path(path)


def _map_error(err: BaseException, repo_id: str, revision: str | None, token: str | None,
               local_dir) -> MoecliError | None:
    """The one-line moecli error for an exception out of huggingface_hub (None: not ours to explain)."""
    hf = _hf()
    rev = revision or "main"
    reason = first_line(err)
    where = str(local_dir) if local_dir is not None else hf.constants.HF_HUB_CACHE
    if _is_disk_full(err):
        return ResourceError(f"no space left on the disk while downloading {repo_id} to {where}",
                             "free disk space, or point HF_HOME (or --local-dir) at a larger disk")
    if isinstance(err, _hf_error("GatedRepoError", ())):
        who = "your token has no access to" if token or _has_token() else "no access token was given for"
        return DownloadError(f"{repo_id} is a gated repository and {who} it", AUTH_HINT)
    if isinstance(err, _hf_error("RepositoryNotFoundError", ())):
        return DownloadError(f"repository {repo_id} was not found on the Hub ({_status(err)})",
                             "check the repo id; if it is private, set HF_TOKEN (or use `moe download --token`)")
    if isinstance(err, _hf_error("RevisionNotFoundError", ())):
        return DownloadError(f"revision {rev!r} was not found in {repo_id}",
                             "check the branch, tag or commit hash (the default is main)")
    if isinstance(err, _hf_error("RemoteEntryNotFoundError", ())):
        return DownloadError(f"a file listed in {repo_id}@{rev} is missing on the Hub ({reason})",
                             "run the same command again; the repository may have changed meanwhile")
    if isinstance(err, _hf_error("LocalEntryNotFoundError", ())) or isinstance(
            err, _hf_error("OfflineModeIsEnabled", ())):
        cached = "only partly in" if isinstance(err, _hf_error("IncompleteSnapshotError", ())) else "not in"
        if hf.constants.is_offline_mode() or _caused_by(err, _hf_error("OfflineModeIsEnabled", ())):
            return DownloadError(f"{repo_id} is {cached} the local cache and offline mode is on", OFFLINE_HINT)
        if _caused_by(err, _hf_error("HfHubHTTPError", ())):
            return _map_error(_cause_of(err, _hf_error("HfHubHTTPError", ())), repo_id, revision, token, local_dir)
        return DownloadError(f"cannot reach the Hub at {hf.constants.ENDPOINT}, and {repo_id} is {cached} the "
                             "local cache", "check the network connection (and HF_ENDPOINT or proxy settings), "
                             "then run the same command again")
    if isinstance(err, _hf_error("HfHubHTTPError", ())):
        code = getattr(getattr(err, "response", None), "status_code", None)
        if code in (401, 403):
            return DownloadError(f"the Hub refused access to {repo_id} (HTTP {code})", AUTH_HINT)
        if code == 429:
            return DownloadError(f"the Hub is rate-limiting downloads of {repo_id} (HTTP 429)",
                                 "wait a few minutes, then " + RESUME_HINT)
        if code is not None and code >= 500:
            return DownloadError(f"the Hub failed while serving {repo_id} (HTTP {code})",
                                 "the Hub may be down; try later and " + RESUME_HINT)
        return DownloadError(f"the Hub answered HTTP {code} for {repo_id}: {reason}", RESUME_HINT)
    if isinstance(err, _hf_error("LocalTokenNotFoundError", ())):
        return DownloadError("no Hugging Face token was found", "set HF_TOKEN or use `moe download --token`")
    if isinstance(err, _hf_error("HFValidationError", ())):
        return UsageError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id",
                          "pass a checkpoint directory or a repo id such as mistralai/Mixtral-8x7B-v0.1")
    if isinstance(err, _transport_errors()) or isinstance(err, (ConnectionError, TimeoutError)):
        return DownloadError(f"the connection broke while downloading {repo_id} ({reason})", RESUME_HINT)
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return DownloadError(f"a file of {repo_id} arrived incomplete", RESUME_HINT)
    if isinstance(err, OSError):
        return DownloadError(f"cannot store the download of {repo_id} in {where} ({reason})",
                             "check that the folder is writable, or set HF_HOME / --local-dir elsewhere")
    return None


def _hf():
    import huggingface_hub
    import huggingface_hub.constants  # noqa: F401 - `huggingface_hub.constants` attribute

    return huggingface_hub


def _hf_error(name: str, default):
    """An exception class of huggingface_hub by name (older versions lack some)."""
    import huggingface_hub.errors as errors
    import huggingface_hub.utils as utils

    return getattr(errors, name, None) or getattr(utils, name, None) or default


def _transport_errors() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout", "ChunkedEncodingError"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                classes.append(cls)
    return tuple(classes)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _caused_by(err: BaseException, cls) -> bool:
    return bool(cls) and any(isinstance(e, cls) for e in list(_chain(err))[1:])


def _cause_of(err: BaseException, cls) -> BaseException:
    return next(e for e in list(_chain(err))[1:] if isinstance(e, cls))


def _is_disk_full(err: BaseException) -> bool:
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(err))


def _status(err: BaseException) -> str:
    code = getattr(getattr(err, "response", None), "status_code", None)
    return f"HTTP {code}" if code else first_line(err)


def _has_token() -> bool:
    try:
        return _hf().get_token() is not None
    except Exception:  # noqa: BLE001 - a broken token file only changes the wording
        return False


# ----------------------------------------------------------------------------------------------
# checking a checkpoint folder


def _remove_with_blob(path: Path) -> None:
    """Delete a file of a snapshot and, in the HF cache, the blob its symlink points to."""
    target = path.resolve() if path.is_symlink() else None
    path.unlink(missing_ok=True)
    if target is not None:
        target.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# display


__all__ = ["INFERENCE_FILES", "CheckpointSummary", "download", "resolve_model", "validate_checkpoint",
           "incomplete_safetensors", "summary_table", "human_bytes", "human_count"]
