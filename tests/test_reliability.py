"""Every bad input gets one clear line, through the real `moe` CLI, and nothing is lost.

Each case runs `moe ...` with Typer's CliRunner and checks the contract of `moecli.cli.app`: a non-zero
exit code (2 for bad arguments), exactly one line on stderr, `error: what is wrong — what to do`,
naming the problem, and no traceback; `moe --debug ...` raises the error instead. The cases, in the
order of the reliability issue: broken checkpoints, bad arguments, the environment (offline, gated,
missing repos and revisions, a connection or disk that fails mid-download, too little memory), and
the chat session (Ctrl-C, Ctrl-D, /save and /load failures, an exception during a reply).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from moecli.cli import app as cli
from moecli.cli.main import app
from moecli.errors import (CheckpointError, ConfigError, DownloadError, MoecliError, ResourceError, TokenizerError,
                           UsageError)

runner = CliRunner()
EXPERT = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def moe(*args, input=None, env=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def one_line_error(result, *words: str, code: int | None = None) -> str:
    """Assert the CLI's error contract and return the error line."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and " — " in line, line  # what — fix
    for word in words:
        assert word in line, (word, line)
    assert "Traceback" not in result.output
    return line


def last_line_error(result, *words: str) -> str:
    """The same for commands that draw a download progress bar on stderr before failing: the error is the
    one and last `error:` line."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert "Traceback" not in result.output
    return lines[-1]


def raises_with_debug(args, cls: type[MoecliError], input=None):
    """`moe --debug ...` lets the error propagate (CliRunner catches it) instead of printing one line."""
    try:
        result = moe("--debug", *args, input=input)
    finally:
        cli.DEBUG["on"] = False  # the flag is process-wide
    assert isinstance(result.exception, cls), (result.exception, result.output)
    assert result.exit_code != 0
    assert result.exc_info is not None and result.exc_info[2] is not None  # a traceback to print
    return result


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    """`moe --debug` sets a process-wide flag; each test starts without it."""
    monkeypatch.setitem(cli.DEBUG, "on", False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return chat_checkpoint(tmp_path_factory.mktemp("plain"), "plain")


@pytest.fixture
def broken(plain, tmp_path) -> Path:
    """A copy of the plain checkpoint, to damage."""
    folder = tmp_path / "broken"
    shutil.copytree(plain, folder)
    return folder


def generate(folder, *extra, input=None):
    return moe("generate", "--model", folder, "--prompt", "the water", "--max-tokens", 3, "--temperature", 0,
               *extra, input=input)


def rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def shard(folder: Path) -> list[str]:
    """Split model.safetensors into two shards plus model.safetensors.index.json, as transformers does."""
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for file, part in zip(files, halves):
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def retype(folder: Path, name: str, dtype: str, shape: list[int]) -> None:
    """Rewrite one tensor's header entry in place (same bytes): a well-formed file with another dtype."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[name].update(dtype=dtype, shape=shape)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


# == 1. checkpoints =====================================================================================


def test_a_working_checkpoint_generates(plain):
    result = generate(plain)
    assert result.exit_code == 0 and result.stderr == "", result.output


def test_missing_config_json(broken):
    (broken / "config.json").unlink()
    one_line_error(generate(broken), "no config.json", "moe download", code=1)
    raises_with_debug(["generate", "--model", broken, "--prompt", "hi"], ConfigError)


def test_config_json_that_is_not_json(broken):
    (broken / "config.json").write_text('{"model_type": "mixtral", ')
    one_line_error(generate(broken), "config.json is not valid JSON", "re-download", code=1)


def test_unknown_model_type_lists_the_supported_ones(broken):
    edit_config(broken, model_type="llama")
    line = one_line_error(generate(broken), "model_type 'llama' is not supported", code=1)
    assert all(family in line for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"))


def test_config_without_model_type(broken):
    config = json.loads((broken / "config.json").read_text())
    del config["model_type"]
    (broken / "config.json").write_text(json.dumps(config))
    one_line_error(generate(broken), "names no model_type", "mixtral", code=1)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "big", "'hidden_size' must be int"),
    ("num_hidden_layers", 0, "'num_hidden_layers' must be between 1"),
    ("num_key_value_heads", 0, "'num_key_value_heads' must be between 1"),
    ("num_local_experts", -4, "'num_local_experts' must be between 0"),
    ("vocab_size", 10**30, "'vocab_size' must be between 1"),
    ("rms_norm_eps", float("nan"), "'rms_norm_eps' must be a finite float"),
    ("rope_parameters", {"rope_type": "yarn", "factor": -2.0, "rope_theta": 1e6}, "rope factor must be positive"),
])
def test_a_damaged_config_field_is_named(broken, field, value, message):
    edit_config(broken, **{field: value})
    one_line_error(generate(broken), message, code=1)


def test_a_shard_named_by_the_index_but_absent(broken):
    files = shard(broken)
    assert generate(broken).exit_code == 0  # the sharded copy is good
    (broken / files[1]).unlink()
    one_line_error(generate(broken), f"shard {files[1]} named by model.safetensors.index.json is missing",
                   "moe download", code=1)
    raises_with_debug(["generate", "--model", broken, "--prompt", "hi"], CheckpointError)


def test_a_broken_index(broken):
    shard(broken)
    (broken / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    one_line_error(generate(broken), "not a valid safetensors index", code=1)


@pytest.mark.parametrize("keep", [-1, 0.5, 100, 5, 0])
def test_a_truncated_safetensors_file(broken, keep):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep if keep >= 0 else len(data) - 1])
    one_line_error(generate(broken), "model.safetensors is truncated", "moe download", code=1)


def test_a_corrupt_safetensors_file(broken):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))
    one_line_error(generate(broken), "model.safetensors has a corrupt safetensors header", code=1)
    path.write_bytes(b"\x15" + b"\x00" * 7 + b'{"a": "not a tensor"}!!')
    one_line_error(generate(broken), "model.safetensors has a malformed safetensors header", code=1)
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 60)  # a GGUF file renamed
    one_line_error(generate(broken), "model.safetensors is not a safetensors file", code=1)


def test_a_missing_tensor_is_named(broken):
    rewrite(broken, lambda t: t.pop(EXPERT))
    one_line_error(generate(broken), f"tensor {EXPERT} (shape (40, 32)) is missing", code=1)


def test_an_unexpected_tensor_is_named(broken):
    rewrite(broken, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    one_line_error(generate(broken), "unexpected tensor model.layers.0.extra.weight", code=1)


def test_a_misshaped_tensor_is_named(broken):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(broken, lambda t: t.update({name: np.zeros((3, 32), np.float32)}))
    one_line_error(generate(broken), f"tensor {name} has shape (3, 32), expected (16, 32)", code=1)


def test_a_quantization_config_is_refused_before_loading(broken):
    edit_config(broken, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    line = one_line_error(generate(broken), "quantized checkpoints are not supported", "gptq", code=1)
    assert "unquantized" in line
    raises_with_debug(["generate", "--model", broken, "--prompt", "hi"], ConfigError)


@pytest.mark.parametrize("dtype,factor,shown", [("I8", 4, "int8"), ("U8", 4, "uint8"), ("F8_E4M3", 4, "float8_e4m3fn"),
                                                ("I32", 1, "int32")])
def test_quantized_tensors_are_refused(broken, dtype, factor, shown):
    """int8/uint8/float8 weights, and int4 packed into int32 (GPTQ's qweight), with consistent headers."""
    name = "model.layers.0.self_attn.q_proj.weight"
    retype(broken, name, dtype, [32, 32 * factor])  # the same 32 x 32 float32 bytes
    line = one_line_error(generate(broken), f"tensor {name}", shown, "quantized checkpoints are not supported",
                          code=1)
    assert "unquantized" in line


def test_float64_tensors_are_refused(broken):
    retype(broken, "model.norm.weight", "F64", [16])
    one_line_error(generate(broken), "model.norm.weight", "float64", "cannot load", code=1)


def test_a_missing_tokenizer(broken):
    (broken / "tokenizer.model").unlink()
    one_line_error(generate(broken), "no tokenizer in", "tokenizer.json or tokenizer.model", code=1)
    raises_with_debug(["generate", "--model", broken, "--prompt", "hi"], TokenizerError)


def test_a_broken_tokenizer_config(broken):
    (broken / "tokenizer_config.json").write_text("[1, 2")
    one_line_error(generate(broken), "tokenizer_config.json", "not valid JSON", code=1)


def test_folders_and_paths_that_are_not_checkpoints(tmp_path, plain):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")
    one_line_error(generate(tmp_path / "photos"), "is not a Hugging Face checkpoint: no config.json", code=1)
    one_line_error(generate(plain / "config.json"), "is a file, not a checkpoint folder", code=2)
    one_line_error(generate(tmp_path / "no" / "such" / "folder"), "neither a local folder nor a valid Hub repo id",
                   code=2)
    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(plain / name, torch_only)
    (torch_only / "pytorch_model.bin").write_bytes(b"PK")
    one_line_error(generate(torch_only), "no *.safetensors weights", "safetensors checkpoints only", code=1)


# == 2. arguments ========================================================================================


@pytest.mark.parametrize("flag,value,message", [
    ("--temperature", -0.5, "temperature must be >= 0"), ("--temperature", "nan", "temperature must be >= 0"),
    ("--top-p", 0, "top_p must be in (0, 1]"), ("--top-p", 1.5, "top_p must be in (0, 1]"),
    ("--top-k", -1, "top_k must be an integer >= 0"),
    ("--min-p", -0.1, "min_p must be in [0, 1]"), ("--min-p", 1.5, "min_p must be in [0, 1]"),
    ("--max-tokens", 0, "max_tokens must be positive"), ("--max-tokens", -3, "max_tokens must be positive"),
    ("--repetition-penalty", 0, "repetition_penalty must be > 0"),
    ("--dtype", "int4", "unknown dtype 'int4'"),
    ("--context", 0, "context window must be positive"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_flags_exit_2_with_one_line(plain, command, flag, value, message):
    args = [command, "--model", plain, flag, value] + (["--prompt", "hi"] if command == "generate" else [])
    one_line_error(moe(*args, input="hello\n"), message, code=2)


def test_bad_flag_raises_with_debug(plain):
    raises_with_debug(["generate", "--model", plain, "--prompt", "hi", "--top-p", 2], UsageError)


@pytest.mark.parametrize("prompt,stdin", [("", None), ("   \n\t", None), ("-", ""), ("-", "  \n")])
def test_an_empty_prompt(plain, prompt, stdin):
    one_line_error(moe("generate", "--model", plain, "--prompt", prompt, input=stdin), "the prompt is empty", code=2)


def test_a_prompt_longer_than_the_context_window_is_an_error(plain):
    result = moe("generate", "--model", plain, "--prompt", "the water " * 40, "--context", 16)
    line = one_line_error(result, "tokens but the context window is 16", code=2)
    assert "does not truncate" in line
    assert result.stdout == ""  # nothing was generated from a silently cut prompt


def test_unknown_chat_command_and_bad_set_values(plain):
    script = "/bogus\n/set top_p 7\n/set temperature hot\n/set colour red\n/set max_tokens 0\n/set\n/save\n/exit\n"
    result = moe("chat", "--model", plain, input=script)
    assert result.exit_code == 0, result.output  # the session goes on after each error
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 7 and all(line.startswith("error: ") and " — " in line for line in errors), errors
    for line, words in zip(errors, ["unknown command /bogus", "top_p must be in (0, 1]", "temperature needs a float",
                                    "unknown setting 'colour'", "max_tokens must be positive", "usage: /set NAME VALUE",
                                    "usage: /save FILE"]):
        assert words in line, (words, line)
    assert "Traceback" not in result.output and "bye" in result.stdout


# == 3. environment ======================================================================================

REPO = "org/tiny"


@pytest.fixture(scope="module")
def repo_files(plain, tmp_path_factory) -> dict[str, bytes]:
    """The plain checkpoint, in two shards, as a Hub repository."""
    folder = tmp_path_factory.mktemp("repo")
    shutil.copytree(plain, folder, dirs_exist_ok=True)
    shard(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture
def fake(repo_files, tmp_path, monkeypatch):
    from fakehub import FakeHub

    repos = {REPO: repo_files, "org/gated": repo_files, "org/int8": int8_weights(repo_files)}
    with FakeHub(repos, gated={"org/gated": "hf_good"}) as server:
        server.activate(monkeypatch, tmp_path / "hf_home")
        yield server


def int8_weights(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same repo with one tensor stored as int8 (same bytes, four times the columns)."""
    name, file = "model.layers.0.self_attn.q_proj.weight", None
    weight_map = json.loads(files["model.safetensors.index.json"])["weight_map"]
    file = weight_map[name]
    data = files[file]
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    rows, cols = header[name]["shape"]
    header[name].update(dtype="I8", shape=[rows, cols * 4])
    raw = json.dumps(header).encode()
    return {**files, file: struct.pack("<Q", len(raw)) + raw + data[8 + n:]}


def offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def snapshot_files(tmp_path, server) -> dict[str, bytes]:
    folder = tmp_path / "hf_home" / "hub" / "models--org--tiny" / "snapshots" / server.commit(REPO)
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


def test_downloading_a_quantized_checkpoint(fake):
    line = last_line_error(moe("download", "org/int8"), "quantized checkpoints are not supported", "int8")
    assert "q_proj" in line and "unquantized" in line


def test_offline_and_not_cached(fake, monkeypatch):
    offline(monkeypatch)
    one_line_error(generate(REPO), f"{REPO} is not in the local cache and offline mode is on", "HF_HUB_OFFLINE",
                   code=1)
    last_line_error(moe("download", REPO), "offline")
    assert fake.requests == []
    raises_with_debug(["generate", "--model", REPO, "--prompt", "hi"], DownloadError)


def test_a_gated_repo_without_a_token(fake):
    last_line_error(generate("org/gated"), "org/gated is a gated repository", "HF_TOKEN", "--token")
    last_line_error(moe("download", "org/gated", "--token", "hf_wrong"), "gated", "your token has no access")
    assert moe("download", "org/gated", "--token", "hf_good").exit_code == 0


def test_a_repo_or_revision_that_does_not_exist(fake):
    last_line_error(generate("org/nope"), "repository org/nope was not found on the Hub", "check the repo id")
    last_line_error(moe("download", REPO, "--revision", "v9"), "revision 'v9' was not found", "branch")
    last_line_error(moe("generate", "--model", REPO, "--revision", "v9", "--prompt", "hi"), "revision 'v9'")


def test_the_network_dropping_mid_download_then_resuming(fake, repo_files, tmp_path, monkeypatch):
    second = "model-00002-of-00002.safetensors"
    fake.cut(second, after=len(repo_files[second]) // 2, then_drop=5)  # more than the client's retries
    last_line_error(moe("download", REPO), "connection broke", "run the same command again")
    assert second not in snapshot_files(tmp_path, fake)  # the partial shard is never taken as complete
    with monkeypatch.context() as m:
        offline(m)
        one_line_error(generate(REPO), "only partly in the local cache", code=1)

    fake.requests.clear()
    result = moe("download", REPO)
    assert result.exit_code == 0, result.output
    assert fake.downloaded() == {second}  # the files finished before the drop were kept
    assert snapshot_files(tmp_path, fake) == repo_files
    offline(monkeypatch)
    assert generate(REPO).exit_code == 0  # and the model runs from the cache


def test_the_disk_filling_during_a_download(fake, repo_files, tmp_path, monkeypatch):
    import huggingface_hub.file_download as fd

    real_http_get, victim = fd.http_get, "model-00002-of-00002.safetensors"

    class FullDisk:
        """A temporary file on a disk that fills up after 1000 bytes."""

        def __init__(self, f):
            self.f, self.room = f, 1000

        def write(self, chunk):
            if len(chunk) > self.room:
                self.f.write(chunk[:self.room])
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(chunk)
            return self.f.write(chunk)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def http_get(url, temp_file, *args, **kwargs):
        return real_http_get(url, FullDisk(temp_file) if url.endswith(victim) else temp_file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(fd, "http_get", http_get)
        line = last_line_error(moe("download", REPO), "no space left on the disk", "free disk space")
        assert "HF_HOME" in line
    assert victim not in snapshot_files(tmp_path, fake)
    assert not list((tmp_path / "hf_home").rglob("*.incomplete"))  # no partial file left to be taken as complete

    result = moe("download", REPO)  # space freed: the next run finishes
    assert result.exit_code == 0, result.output
    assert snapshot_files(tmp_path, fake) == repo_files


def test_too_little_memory_is_refused_before_loading(plain, monkeypatch):
    from moecli.checkpoints import loader as checkpoint
    from moecli.checkpoints.families import load_config
    from moecli.model.sizes import parameter_counts

    f32 = parameter_counts(load_config(plain)).total * 4
    gpu = checkpoint.FreeMemory(f32 // 2 + 1000, "on cuda:0 (Fake GPU)", True)  # room for bfloat16, not float32
    monkeypatch.setattr(checkpoint, "available_memory", lambda: gpu)
    line = one_line_error(generate(plain, "--dtype", "float32"), "the weights need", "in float32 but only",
                          "free on cuda:0", code=1)
    assert "--dtype bfloat16" in line and "--devices N" in line
    raises_with_debug(["generate", "--model", plain, "--prompt", "hi", "--dtype", "float32"], ResourceError)
    assert generate(plain, "--dtype", "bfloat16").exit_code == 0  # the suggested fix works

    host = checkpoint.FreeMemory(4096, "in host memory", False)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: host)
    line = one_line_error(generate(plain), "free in host memory", code=1)
    assert "--dtype bfloat16" in line and "--devices" not in line  # no other devices share host memory
    monkeypatch.setenv("MOECLI_NO_MEMORY_CHECK", "1")
    assert generate(plain).exit_code == 0


def test_the_memory_check_uses_the_real_figure(plain):
    """No patching: the tiny model fits, and the figure comes from the device or /proc/meminfo."""
    from moecli.checkpoints import loader as checkpoint
    from moecli.checkpoints.families import load_config

    free = checkpoint.available_memory()
    if Path("/proc/meminfo").exists():
        assert free is not None and free.free > 0
    checkpoint.check_memory(load_config(plain), np.float32)


@pytest.mark.parametrize("error,words", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.", ["could not allocate 16.0 GiB"]),
    ("RESOURCE_EXHAUSTED: Failed to allocate request for 2.00GiB (2147483648B) on device ordinal 0\nBFC stats ...",
     ["could not allocate 2.0 GiB"]),
])
def test_running_out_of_device_memory_while_loading(plain, monkeypatch, error, words):
    import jax

    from moecli.inference import engine

    def out_of_memory(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(error)

    monkeypatch.setattr(engine, "load_params", out_of_memory)
    line = one_line_error(generate(plain), "out of", "memory", *words, code=1)
    assert "--dtype bfloat16" in line and "--devices N" in line
    result = moe("--debug", "generate", "--model", plain, "--prompt", "hi")
    assert isinstance(result.exception, jax.errors.JaxRuntimeError)  # --debug: the original error


def test_running_out_of_host_memory(plain, monkeypatch):
    from moecli.inference import engine

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(engine, "load_params", out_of_memory)
    one_line_error(generate(plain), "out of host memory", "--dtype bfloat16", code=1)


def test_a_bug_is_not_hidden(plain, monkeypatch):
    """An unexpected exception is a bug: it keeps its traceback rather than becoming a vague line."""
    from moecli.inference import engine

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(engine, "load_params", bug)
    result = generate(plain)
    assert isinstance(result.exception, ZeroDivisionError)


def test_ctrl_c_during_generate_exits_130(plain, monkeypatch):
    import moecli.inference.text

    def interrupted(*args, **kwargs):
        yield "To be"
        raise KeyboardInterrupt

    monkeypatch.setattr(moecli.inference.text, "stream_tokens_as_text", interrupted)  # what `moe generate` streams
    result = generate(plain)
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted" and "Traceback" not in result.output


# == 4. chat =============================================================================================


def chat(folder, script: str, *extra):
    return moe("chat", "--model", folder, "--temperature", 0, "--max-tokens", 8, *extra, input=script)


def chat_errors(result) -> list[str]:
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    assert "Traceback" not in result.output
    return lines


def test_chat_with_a_broken_model_exits_non_zero(broken):
    (broken / "tokenizer.model").unlink()
    one_line_error(moe("chat", "--model", broken, input="hello\n"), "no tokenizer", code=1)


def test_ctrl_d_leaves_cleanly(plain):
    result = chat(plain, "hello\n")  # then end of input, as Ctrl-D
    assert result.exit_code == 0 and "bye" in result.stdout and result.stderr == ""


def test_ctrl_c_mid_reply_keeps_the_partial_reply(plain, tmp_path, monkeypatch):
    import moecli.inference.text

    real = moecli.inference.text.stream_tokens_as_text  # what a chat reply streams through

    def ctrl_c_after_the_first_piece(*args, **kwargs):
        for i, piece in enumerate(real(*args, **kwargs)):
            yield piece
            if i == 0:
                os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends; moe chat's handler catches it

    monkeypatch.setattr(moecli.inference.text, "stream_tokens_as_text", ctrl_c_after_the_first_piece)
    saved = tmp_path / "chat.json"
    result = chat(plain, f"tell me a story\n/save {saved}\n", "--max-tokens", 40)
    assert result.exit_code == 0 and chat_errors(result) == []
    assert "[interrupted]" in result.stdout
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["interrupted"] is True and messages[1]["content"]


def test_ctrl_c_at_the_prompt_clears_the_line(plain, monkeypatch):
    from moecli.cli.commands import chat as chat_command

    lines = iter([KeyboardInterrupt, "hello", EOFError])

    def read():
        item = next(lines)
        if isinstance(item, type):
            raise item
        return item

    monkeypatch.setattr(chat_command, "make_input", lambda console: read)
    result = chat(plain, "")
    assert result.exit_code == 0 and "bye" in result.stdout and chat_errors(result) == []


def test_save_to_an_unwritable_path_and_bad_loads(plain, tmp_path):
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "list.json").write_text('{"messages": [{"role": "wizard", "content": 3}]}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    saved = tmp_path / "kept.json"
    script = "\n".join(["hello", f"/save {tmp_path}/no/such/dir/chat.json", f"/save {tmp_path}",
                        f"/load {tmp_path}/missing.json", f"/load {tmp_path}/garbage.json", f"/load {tmp_path}/list.json",
                        f"/load {tmp_path}/binary.json", f"/save {saved}"]) + "\n"
    result = chat(plain, script)
    assert result.exit_code == 0, result.output
    errors = chat_errors(result)
    assert len(errors) == 6, errors
    for line, words in zip(errors, ["cannot write", "cannot write", "cannot read", "invalid JSON", "no valid messages",
                                    "invalid JSON"]):
        assert words in line and " — " in line, (words, line)
    messages = json.loads(saved.read_text())["messages"]  # nothing was lost along the way
    assert [m["role"] for m in messages] == ["user", "assistant"]


def failing_replies(monkeypatch, message: str, on_call: int = 2) -> None:
    """The `on_call`-th reply raises RuntimeError(message) after its first piece."""
    import moecli.inference.text

    real, calls = moecli.inference.text.stream_tokens_as_text, {"n": 0}  # what a chat reply streams through

    def fails(*args, **kwargs):
        calls["n"] += 1
        for piece in real(*args, **kwargs):
            yield piece
            if calls["n"] == on_call:
                raise RuntimeError(message)

    monkeypatch.setattr(moecli.inference.text, "stream_tokens_as_text", fails)


def test_an_exception_inside_generation_keeps_the_conversation(plain, tmp_path, monkeypatch):
    failing_replies(monkeypatch, "device fell over")
    saved = tmp_path / "after.json"
    result = chat(plain, f"hello\nand then?\nonce more\n/save {saved}\n")
    assert result.exit_code == 0, result.output
    errors = chat_errors(result)
    assert len(errors) == 1 and "generation failed (RuntimeError: device fell over)" in errors[0]
    assert "the conversation is kept" in errors[0]
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[3].get("error") is True and "error" not in messages[5]  # the third turn ran normally


def test_a_multi_line_exception_inside_generation_is_one_line(plain, monkeypatch):
    failing_replies(monkeypatch, "XLA failed:\n  at frame 1\n  at frame 2", on_call=1)
    result = chat(plain, "hello\n")
    assert result.exit_code == 0
    assert len(chat_errors(result)) == 1


def test_a_chat_message_longer_than_the_context(plain):
    result = chat(plain, "the water " * 60 + "\nhello\n", "--context", 32)
    assert result.exit_code == 0, result.output
    errors = chat_errors(result)
    assert len(errors) == 1 and "the context window is 32" in errors[0] and "--context" in errors[0]
