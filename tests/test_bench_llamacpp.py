"""`moe bench --compare-llamacpp`: llama.cpp runs the same weights (as GGUF) with the same prompt
and thread count, the JSON has a `llamacpp` entry per precision with the paired ratios, and
without llama-cpp-python the flag is one error line. The end-to-end tests need llama-cpp-python
(`pip install -e ".[test,bench]"`) and are skipped only when it is missing."""
from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from moecli.benchmark import harness as bench
from moecli.benchmark import llamacpp
from moecli.cli.main import app
from test_bench import TINY, tiny_shape  # noqa: F401 (tiny_shape is a fixture)

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (moecli[bench])")


def test_missing_llama_cpp_is_one_error_line(tiny_shape, tmp_path, monkeypatch):
    """Without llama-cpp-python (mocked away, so this runs everywhere): one line naming the extra,
    exit 1, and nothing written first."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--compare-llamacpp"])
    assert result.exit_code == 1
    assert "pip install 'moecli[bench]'" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cache" / "bench").exists()


def test_quantize_without_moecli_support_times_llama_cpp_alone(tiny_shape, tmp_path, monkeypatch):
    """--quantize q8 on a moecli whose load_model has no quantize=: llama.cpp's Q8_0 still runs,
    moecli's column says "not available", and the ratio is None."""
    calls = []

    def fake_run(engine, target, dtype, prompt_len, new_tokens, timeout, **options):
        calls.append((engine, str(target), options))
        return dict({key: 1.0 for key in bench.METRICS}, decode_tok_s=7.0, prefill_tok_s=70.0, device="cpu",
                    version="v", threads=1)

    monkeypatch.setattr(llamacpp, "require", lambda: "0.0")
    monkeypatch.setattr(llamacpp, "gguf", lambda folder, precision, dtype, threads: tmp_path / f"{precision}.gguf")
    monkeypatch.setattr(bench, "moecli_quantizes", lambda: False)
    monkeypatch.setattr(bench, "write_synthetic", lambda shape, dtype: tmp_path)
    monkeypatch.setattr(bench, "run_engine", fake_run)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--compare-llamacpp", "--quantize", "q8", "--threads", "1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert calls == [("llamacpp", str(tmp_path / "q8.gguf"), {"threads": 1, "quantize": "q8"})]
    data = json.loads(out.read_text())
    assert data["moecli"]["available"] is False and "not available" in data["moecli"]["reason"]
    entry = data["llamacpp"]["q8"]
    assert entry["gguf_type"] == "Q8_0" and entry["decode_tok_s"] == 7.0 and entry["ratio"] is None
    assert "moecli: not available" in result.stdout and "llama.cpp Q8_0" in result.stdout


def test_llamacpp_ratios_are_paired_medians(tiny_shape, tmp_path, monkeypatch):
    """--repeat 3 with llama.cpp: the engines alternate, and its ratio is the median of the pairs'."""
    decode = {"moecli": iter([10.0, 30.0, 12.0]), "llamacpp": iter([5.0, 10.0, 8.0])}
    calls = []

    def fake_run(engine, target, dtype, prompt_len, new_tokens, timeout, **options):
        calls.append(engine)
        return dict({key: 1.0 for key in bench.METRICS}, decode_tok_s=next(decode[engine]), prefill_tok_s=2.0,
                    device="cpu", version="v")

    monkeypatch.setattr(llamacpp, "require", lambda: "0.0")
    monkeypatch.setattr(llamacpp, "gguf", lambda folder, precision, dtype, threads: tmp_path / "m.gguf")
    monkeypatch.setattr(bench, "write_synthetic", lambda shape, dtype: tmp_path)
    monkeypatch.setattr(bench, "run_engine", fake_run)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--compare-llamacpp", "--dtype", "bfloat16", "--repeat", "3",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert calls == ["moecli", "llamacpp", "llamacpp", "moecli", "moecli", "llamacpp"]
    entry = json.loads(out.read_text())["llamacpp"]["bfloat16"]
    assert entry["gguf_type"] == "BF16" and entry["decode_tok_s"] == 8.0
    assert entry["ratio_runs"]["decode"] == [2.0, 3.0, 1.5] and entry["ratio"]["decode"] == 2.0
    assert "2.00x (1.50-3.00)" in result.stdout and "llama.cpp BF16" in result.stdout


def test_bad_threads_and_quantize_are_usage_errors(tiny_shape):
    for args, message in ((["--threads", "0"], "--threads must be between 1"),
                          (["--quantize", "q3"], "--quantize must be q8 or q4"),
                          (["--quantize", "q8", "--compare-hf"], "no transformers counterpart")):
        result = CliRunner().invoke(app, ["bench", tiny_shape, *args])
        assert result.exit_code == 2 and message in result.stderr, args


def test_tokenizer_has_exactly_the_vocabulary_size(tmp_path):
    import sentencepiece as spm

    for size in (256, 1000):
        llamacpp.write_tokenizer(tmp_path / "tokenizer.model", size)
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
        assert sp.vocab_size() == size and sp.id_to_piece(1) == "<s>"


def test_converter_extraction_keeps_only_the_converter(tmp_path):
    """Only vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/} leave the archive, and
    a member named with ".." cannot write outside the destination."""
    sdist = tmp_path / "llama_cpp_python-0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("p/vendor/llama.cpp/convert_hf_to_gguf.py", "p/vendor/llama.cpp/conversion/base.py",
                     "p/vendor/llama.cpp/gguf-py/gguf/__init__.py", "p/vendor/llama.cpp/src/llama.cpp",
                     "p/vendor/llama.cpp/conversion/../../../../evil.py", "p/llama_cpp/llama.py"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"x\n"))
    dest = tmp_path / "out"
    llamacpp.extract_converter(sdist, dest)
    found = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert found == ["conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "evil.py").exists()


def test_a_failed_conversion_is_one_error_line(tiny_shape, tmp_path, monkeypatch):
    """The converter's last stderr line becomes moecli's error; no GGUF is left behind, and the
    converter saw the checkpoint's files plus a tokenizer of the config's vocabulary size."""
    import sentencepiece as spm

    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nsys.exit('KeyError: no such tensor')\n")
    monkeypatch.setattr(llamacpp, "require", lambda: "0.0")
    monkeypatch.setattr(llamacpp, "converter", lambda version: script)
    folder = bench.write_synthetic(tiny_shape, "float32")
    with pytest.raises(llamacpp.MoecliError, match="converter failed .*KeyError: no such tensor"):
        llamacpp.gguf(folder, "float32", "float32", threads=1)
    work = llamacpp.work_dir(folder)
    assert not list(work.glob("*.gguf")) and (work / "hf" / "config.json").is_symlink()
    tokenizer = spm.SentencePieceProcessor(model_file=str(work / "hf" / "tokenizer.model"))
    assert tokenizer.vocab_size() == TINY["vocab_size"] and not (folder / "tokenizer.model").exists()


@needs_llama_cpp
def test_gguf_gives_moecli_logits(tiny_shape):
    """The converted F32 GGUF is the same model: llama.cpp's logits match moecli's."""
    import llama_cpp

    from moecli import load_model

    folder = bench.write_synthetic(tiny_shape, "float32")
    path = llamacpp.gguf(folder, "float32", "float32", threads=1)
    ids = [int(t) for t in bench.prompt_ids(TINY["vocab_size"], 8)]
    ours = np.asarray(load_model(folder, dtype="float32")(np.array([ids])))[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    # llama.cpp keeps its KV cache in float16 (its default): a few 1e-3 apart; a wrong conversion
    # (say, of the rotary q/k layout) is off by whole units
    np.testing.assert_allclose(np.asarray(llm.scores[: len(ids)]), ours, atol=1e-2)


@needs_llama_cpp
def test_compare_llamacpp_end_to_end(tiny_shape, tmp_path):
    """Both engines run (F32, 8 prompt / 4 decode tokens, one thread each) and report numbers."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--compare-llamacpp", "--prompt-len", "8", "--new-tokens",
                                      "4", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    entry, ours = data["llamacpp"]["float32"], data["moecli"]
    assert entry["gguf_type"] == "F32" and entry["gguf"].endswith("model-F32.gguf")
    for engine in (ours, entry):
        assert engine["decode_tok_s"] > 0 and engine["prefill_tok_s"] > 0 and engine["threads"] == 1
    assert entry["ratio"]["decode"] == pytest.approx(ours["decode_tok_s"] / entry["decode_tok_s"])
    assert entry["decode_of_floor"] == pytest.approx(entry["decode_tok_s"] / ours["decode_floor_tok_s"])
    assert f"{entry['ratio']['decode']:.2f}x" in result.stdout and data["setup"]["threads"] == 1


@needs_llama_cpp
def test_q4_0_comes_from_llama_cpps_quantizer_and_runs(tiny_shape):
    """--quantize q4: the Q4_0 file is quantized by llama.cpp from the F32 one, and it runs."""
    import gguf as gguf_py

    folder = bench.write_synthetic(tiny_shape, "float32")
    path = llamacpp.gguf(folder, "q4", "float32", threads=1)
    assert path.name == "model-Q4_0.gguf" and (path.parent / "model-F32.gguf").is_file()
    file_type = gguf_py.GGUFReader(path).fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    result = llamacpp.run_llamacpp(str(path), prompt_len=8, new_tokens=4, threads=1, quantized=True)
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
