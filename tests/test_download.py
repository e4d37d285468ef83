"""`moecli.hub.download` against the real huggingface_hub client talking HTTP to a fake Hub (`fakehub.FakeHub`).

The repo is a tiny Mixtral saved by transformers in four safetensors shards, plus files inference does
not need (.bin/.gguf/original/*) that must never be fetched. Covered: the cache and local_dir layouts,
resumed and failed transfers, gated repos and tokens, missing repos and revisions, offline mode, and
`validate_checkpoint` on good, truncated and incomplete checkpoints.
"""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from fakehub import FakeHub

from moecli.hub import download as hub
from moecli.checkpoints.families import load_config
from moecli.errors import CheckpointError, ConfigError, DownloadError, ResourceError
from moecli.model.sizes import parameter_counts

REPO = "org/tiny-mixtral"
SHARD = "model-00002-of-00004.safetensors"
JUNK = {"pytorch_model.bin", "model.gguf", "original/consolidated.pt", "flax_model.msgpack", "README.md",
        ".gitattributes"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder saved by transformers, its total parameter count by torch)."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    model.save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) == 4
    return folder, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def repo_files(checkpoint) -> dict[str, bytes]:
    folder, _ = checkpoint
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["tokenizer_config.json"] = json.dumps({"model_max_length": 128}).encode()
    files["chat_template.jinja"] = b"{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for name in JUNK:
        files[name] = b"not for inference " * 64
    return files


@pytest.fixture
def fake(repo_files, tmp_path, monkeypatch):
    with FakeHub({REPO: repo_files, "org/gated": repo_files}, gated={"org/gated": "hf_good"}) as server:
        server.activate(monkeypatch, tmp_path / "hf_home")
        yield server


def inference_files(files) -> set[str]:
    return {name for name in files if name not in JUNK}


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def assert_same_files(folder: Path, files: dict[str, bytes]) -> None:
    assert listing(folder) == inference_files(files)
    for name in inference_files(files):
        assert (folder / name).read_bytes() == files[name], name


# -- downloads ------------------------------------------------------------------------------------


def test_download_into_the_cache_fetches_only_inference_files(fake, repo_files, tmp_path, checkpoint):
    folder = hub.download(REPO)  # progress bars on: must not get in the way
    commit = fake.commit(REPO)
    assert folder == tmp_path / "hf_home" / "hub" / "models--org--tiny-mixtral" / "snapshots" / commit
    assert_same_files(folder, repo_files)
    assert fake.downloaded() == inference_files(repo_files)  # the junk was never even requested

    summary = hub.validate_checkpoint(folder)
    config = load_config(folder)
    assert (summary.layers, summary.experts, summary.top_k) == (2, 4, 2)
    assert (summary.total_params, summary.active_params) == parameter_counts(config)[:2]
    assert summary.total_params == checkpoint[1]
    assert summary.active_params < summary.total_params
    assert summary.architecture == "mixtral (MixtralForCausalLM)"
    assert summary.dtype == "float32" and summary.shards == 4
    assert summary.size_bytes == sum(len(v) for k, v in repo_files.items() if k.endswith(".safetensors"))
    table = hub.summary_table(summary)
    assert table.row_count >= 5

    fake.requests.clear()
    assert hub.download(REPO, progress=False) == folder  # cached: nothing is fetched again
    assert fake.downloaded() == set()


def test_download_into_local_dir(fake, repo_files, tmp_path):
    target = tmp_path / "models" / "tiny"
    folder = hub.download(REPO, local_dir=target, progress=False)
    assert folder == target.resolve()
    assert_same_files(folder, repo_files)
    assert not (tmp_path / "hf_home" / "hub" / "models--org--tiny-mixtral" / "snapshots").exists()
    assert hub.validate_checkpoint(folder).total_params == parameter_counts(load_config(folder)).total


def test_a_transfer_cut_off_halfway_is_resumed_with_a_range_request(fake, repo_files):
    half = len(repo_files[SHARD]) // 2
    fake.cut(SHARD, after=half)
    folder = hub.download(REPO, progress=False)
    gets = fake.file_requests(SHARD)
    assert [g.status for g in gets] == [-1, 206]
    assert gets[0].range is None
    start = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= half  # the bytes already on disk are not fetched again
    assert_same_files(folder, repo_files)


def test_a_lost_connection_is_one_download_error_and_the_next_run_finishes(fake, repo_files, tmp_path):
    fake.cut(SHARD, after=len(repo_files[SHARD]) // 2, then_drop=5)  # more than the client's retries
    with pytest.raises(DownloadError) as err:
        hub.download(REPO, progress=False)
    assert "connection" in str(err.value) and "run the same command again" in err.value.hint
    assert "\n" not in err.value.one_line()
    assert any(g.range and g.range.startswith("bytes=") for g in fake.file_requests(SHARD))  # it tried to resume

    # the partial shard is not taken for a complete one
    snapshot = tmp_path / "hf_home" / "hub" / "models--org--tiny-mixtral" / "snapshots" / fake.commit(REPO)
    assert not (snapshot / SHARD).exists()
    assert not list((tmp_path / "hf_home").rglob("*.incomplete"))
    with pytest.raises(CheckpointError, match=SHARD):
        hub.validate_checkpoint(snapshot)
    with pytest.raises(DownloadError, match="offline"):  # nor by the offline look-up
        hub.resolve_model(REPO, offline=True)

    fake.requests.clear()
    folder = hub.download(REPO, progress=False)
    assert fake.downloaded() == {SHARD}  # the files finished before the failure are kept
    assert_same_files(folder, repo_files)
    hub.validate_checkpoint(folder)


def test_download_replaces_a_truncated_file_in_the_cache(fake, repo_files):
    folder = hub.download(REPO, progress=False)
    blob = (folder / SHARD).resolve()
    blob.write_bytes(blob.read_bytes()[:1000])  # damaged after the fact: huggingface_hub would keep it
    with pytest.raises(CheckpointError, match=SHARD):
        hub.validate_checkpoint(folder)
    fake.requests.clear()
    assert hub.download(REPO, progress=False) == folder
    assert fake.downloaded() == {SHARD}
    assert_same_files(folder, repo_files)


# -- access and errors ----------------------------------------------------------------------------


def test_gated_repo_needs_a_token(fake, repo_files, tmp_path, monkeypatch):
    with pytest.raises(DownloadError) as err:
        hub.download("org/gated", progress=False)
    assert "gated" in str(err.value) and "HF_TOKEN" in err.value.hint and "--token" in err.value.hint
    with pytest.raises(DownloadError, match="gated"):
        hub.download("org/gated", token="hf_wrong", progress=False)

    assert_same_files(hub.download("org/gated", token="hf_good", progress=False), repo_files)
    assert all(r.authorization == "Bearer hf_good" for r in fake.file_requests(SHARD))

    fake.activate(monkeypatch, tmp_path / "other_home")  # empty cache; the token comes from the environment
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert_same_files(hub.download("org/gated", progress=False), repo_files)


def test_missing_repo_and_missing_revision(fake):
    with pytest.raises(DownloadError, match="not found") as err:
        hub.download("org/nope", progress=False)
    assert "404" in str(err.value)
    with pytest.raises(DownloadError, match="revision 'v9'") as err:
        hub.download(REPO, revision="v9", progress=False)
    assert "branch" in err.value.hint


def test_an_unreachable_hub(repo_files, tmp_path, monkeypatch):
    with FakeHub({REPO: repo_files}) as gone:
        gone.activate(monkeypatch, tmp_path / "hf_home")
    with pytest.raises(DownloadError, match="cannot reach the Hub") as err:
        hub.download(REPO, progress=False)
    assert "network" in err.value.hint


def test_offline_mode(fake, repo_files, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="offline") as err:
        hub.download(REPO, progress=False)
    assert "HF_HUB_OFFLINE" in err.value.hint
    with pytest.raises(DownloadError, match="offline"):
        hub.resolve_model(REPO)
    assert fake.requests == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    folder = hub.resolve_model(REPO)  # not cached, online: downloaded
    assert_same_files(folder, repo_files)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fake.requests.clear()
    assert hub.resolve_model(REPO) == folder
    assert hub.download(REPO, progress=False) == folder
    assert fake.requests == []
    assert hub.resolve_model(str(tmp_path)) == tmp_path  # a local folder is returned as is


def test_a_full_disk_is_a_resource_error():
    full = OSError(errno.ENOSPC, "No space left on device")
    mapped = hub._map_error(full, REPO, None, None, None)
    assert isinstance(mapped, ResourceError) and "free disk space" in mapped.hint


# -- validate_checkpoint --------------------------------------------------------------------------


@pytest.fixture
def local_copy(checkpoint, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], folder)
    return folder


def test_validate_a_truncated_shard(local_copy):
    path = local_copy / SHARD
    data = path.read_bytes()
    for keep in (len(data) - 1, len(data) // 2, 100, 5):  # in the data, in the header, in the length
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=SHARD) as err:
            hub.validate_checkpoint(local_copy)
        assert "truncated" in str(err.value) and "moe download" in err.value.hint
    assert hub.incomplete_safetensors(local_copy) == [path]


def test_validate_a_missing_shard(local_copy):
    (local_copy / SHARD).unlink()
    with pytest.raises(CheckpointError, match=SHARD):
        hub.validate_checkpoint(local_copy)


def test_validate_an_unsupported_architecture(local_copy):
    config = json.loads((local_copy / "config.json").read_text())
    (local_copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        hub.validate_checkpoint(local_copy)


# -- the `moe download` command ------------------------------------------------------------------

def test_moe_download_command_prints_summary(fake, repo_files, tmp_path):
    from typer.testing import CliRunner

    from moecli.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["download", REPO, "--local-dir", str(tmp_path / "here")])
    assert result.exit_code == 0, result.output
    for word in ("mixtral", "layers", "experts", "active per token", "float32"):
        assert word in result.stdout.lower(), word
    assert_same_files(tmp_path / "here", repo_files)
    gated = runner.invoke(app, ["download", "org/gated"])
    last_line = gated.stderr.strip().splitlines()[-1]
    assert gated.exit_code == 1 and last_line.startswith("error:") and "token" in last_line
    assert "Traceback" not in gated.output
    assert runner.invoke(app, ["download", "org/gated", "--token", "hf_good"]).exit_code == 0
