"""`moe bench --compare-llamacpp`: llama.cpp, through llama-cpp-python, on the same checkpoint.

llama.cpp is the CPU engine to beat, so it is the anchor for moecli's CPU numbers. The bench
gives both engines the same weights, the same prompt token ids and the same thread count:

1. The converter. llama.cpp's own `convert_hf_to_gguf.py` (and the `conversion/` package and the
   `gguf-py/` copy it imports, which match it, unlike PyPI's `gguf` at times) comes from the
   source distribution of the installed llama-cpp-python, downloaded once by pip and cached under
   `cache_dir()/bench/llama.cpp-VERSION/`. It needs torch and transformers (moecli's test extra,
   and the bench extra) to read safetensors and config.json.
2. A tokenizer. The converter insists on one and bench checkpoints have none, so the converter
   reads a folder of links to the checkpoint's files plus a sentencepiece model with exactly the
   config's vocabulary size (its pieces are never used: both engines are fed token ids).
3. GGUF files, one per precision, cached next to that folder: F32, BF16 and Q8_0 written by the
   converter, Q4_0 by llama.cpp's own quantizer (`llama_model_quantize`, llama.cpp's standard Q4_0
   recipe) from the F32 or BF16 file of `--dtype`.
4. The timing, in a subprocess (`harness.run_engine("llamacpp", GGUF, ...)`), as moecli's and
   transformers' are: load, one warm-up run, then prefill of the prompt and greedy batch-1 decoding,
   stamped token by token as moecli's decoder is.

Threads: the harness's worker restricts every engine's process to the same N cores
(`sched_setaffinity`, what `taskset` does) before the engine starts. XLA sizes its intra-op pool,
which moecli's C++ kernels run on, from that set; llama.cpp is also given n_threads = N (its Python
binding would otherwise take half the cores). llama.cpp's threads spin at the barrier after every
operation, so when other programs hold some of those N cores its numbers collapse (on a busy
2-core machine, a tiny model's decoding fell from thousands of tokens/s to a few): give both
engines --threads no more than the idle cores.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from moecli.errors import MoecliError, ResourceError, first_line

#: moecli's precision -> the llama.cpp GGUF type it is compared with.
PRECISIONS = {"float32": "F32", "bfloat16": "BF16", "q8": "Q8_0", "q4": "Q4_0"}
#: The GGUF types the converter writes itself (its --outtype); the others are quantized from one.
CONVERTER_TYPES = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0"}
INSTALL_HINT = "pip install 'moecli[bench]' (it builds llama.cpp: CMake and a C++ compiler)"


def require() -> str:
    """The installed llama-cpp-python's version, or one error line saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ResourceError(f"--compare-llamacpp needs llama-cpp-python, which is not installed "
                            f"({first_line(err)})", INSTALL_HINT) from None
    return llama_cpp.__version__


# ----------------------------------------------------------------------------- the converter

def converter(version: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py of llama-cpp-python `version`, fetched once (pip download
    of the source distribution; only the converter's files are kept)."""
    from moecli.benchmark.harness import bench_dir

    folder = bench_dir() / f"llama.cpp-{version}"
    script = folder / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "--dest", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ResourceError(f"could not download llama-cpp-python {version}'s source for llama.cpp's "
                                f"converter: {tail}", "check the network connection and try again")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent))  # renamed into place once complete
        staging.chmod(0o755)
        extract_converter(sdists[0], staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return script


def extract_converter(sdist: Path, dest: Path) -> None:
    """Copy vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/} out of the sdist.
    Paths are rebuilt from their parts (no "..", no links), so the archive cannot write elsewhere."""
    wanted = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or parts[3] not in wanted:
                continue
            if not member.isfile() or ".." in parts:
                continue
            target = dest.joinpath(*parts[3:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise ResourceError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py",
                            "install a llama-cpp-python release whose source ships llama.cpp (e.g. 0.3.36)")


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A sentencepiece model with exactly `vocab_size` pieces: <unk>, <s>, </s> and one word each
    ("a", "b", ..., "zz", ...), trained as a `word` model on a text that holds each word once. The
    converter only copies the pieces into the GGUF; neither engine ever tokenizes text with it."""
    import sentencepiece as spm

    def word(i: int) -> str:  # i = 0, 1, ... -> a, b, ..., z, aa, ab, ...
        letters = ""
        i += 1
        while i:
            i, r = divmod(i - 1, 26)
            letters = chr(97 + r) + letters
        return letters

    words = [word(i) for i in range(vocab_size)]
    lines = (" ".join(words[i:i + 16]) for i in range(0, len(words), 16))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, model_type="word",
                                   vocab_size=vocab_size, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, num_threads=1)
    path.write_bytes(model.getvalue())


def work_dir(folder: Path) -> Path:
    """Where a checkpoint's GGUF files live: named after the folder and a digest of its path and
    files (a rewritten checkpoint gets new GGUFs; the checkpoint folder itself is never written)."""
    from moecli.benchmark.harness import bench_dir

    folder = Path(folder).resolve()
    digest = hashlib.sha1(str(folder).encode())
    for f in sorted(folder.glob("*.safetensors")) + [f for f in [folder / "config.json"] if f.is_file()]:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return bench_dir() / "llamacpp" / f"{folder.name}-{digest.hexdigest()[:10]}"


def converter_input(folder: Path, work: Path) -> Path:
    """A folder the converter accepts: links to the checkpoint's files, plus a tokenizer when the
    checkpoint has none."""
    from moecli.checkpoints.families import load_config

    source = work / "hf"
    if (source / "config.json").exists():
        return source
    staging = work / "hf.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in Path(folder).resolve().iterdir():
        if f.is_file():
            (staging / f.name).symlink_to(f)
    if not any((staging / name).exists() for name in ("tokenizer.model", "tokenizer.json")):
        write_tokenizer(staging / "tokenizer.model", load_config(folder).vocab_size)
    staging.rename(source)
    return source


def gguf(folder: Path, precision: str, dtype: str, threads: int) -> Path:
    """The GGUF file llama.cpp runs for moecli's `precision` (float32, bfloat16, q8, q4), made once."""
    kind = PRECISIONS[precision]
    work = work_dir(folder)
    out = work / f"model-{kind}.gguf"
    if out.is_file():
        return out
    partial = out.with_suffix(".partial")
    if kind in CONVERTER_TYPES:
        script = converter(require())
        cmd = [sys.executable, str(script), str(converter_input(folder, work)), "--outfile", str(partial),
               "--outtype", CONVERTER_TYPES[kind]]
        what, hint = "llama.cpp's converter", "it needs torch and transformers: " + INSTALL_HINT
    else:  # Q4_0: llama.cpp's quantizer, from the GGUF of the checkpoint's own float dtype
        source = gguf(folder, dtype, dtype, threads)
        cmd = [sys.executable, "-m", "moecli.benchmark.llamacpp", "quantize", str(source), str(partial), kind,
               str(threads)]
        what, hint = "llama.cpp's quantizer", "check the disk space, or delete " + str(work)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not partial.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MoecliError(f"{what} failed on {folder} ({kind}): {tail}", hint)
    partial.rename(out)
    return out


def quantize(source: str, out: str, kind: str, threads: int) -> int:
    """llama.cpp's quantizer (what `llama-quantize SOURCE OUT Q4_0` does); 0 on success."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = threads
    return llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))


# ----------------------------------------------------------------------------- the timing

def run_llamacpp(model_path: str, prompt_len: int, new_tokens: int, threads: int | None = None,
                 quantized: bool = False) -> dict:
    """The worker: llama.cpp's load, time to first token, prefill and decode speed on a GGUF file,
    measured as `harness.run_moecli` measures moecli (same prompt ids, greedy, batch 1).

    llama.cpp 0.3.36's AMX matrix kernels crash (SIGSEGV, in its first matmul) on these
    checkpoints' Q8_0 / Q4_0 weights, so where its build uses AMX, quantized files load without
    its extra buffer types (AMX, and weights repacked for AVX: llama-cli's --no-repack); the result
    says so in `extra_buffers`."""
    import llama_cpp

    from moecli.benchmark.harness import peak_host_mb, prompt_ids

    threads = threads or len(os.sched_getaffinity(0))
    system = llama_cpp.llama_print_system_info().decode().strip()
    extra_buffers = not (quantized and "AMX_INT8 = 1" in system)
    start = time.perf_counter()
    with model_params(use_extra_bufts=extra_buffers):
        llm = llama_cpp.Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads,
                              n_ctx=prompt_len + new_tokens + 16, logits_all=False, verbose=False)
    load_s, load_peak = time.perf_counter() - start, peak_host_mb()
    prompt = [int(t) for t in prompt_ids(llm.n_vocab(), prompt_len)]
    greedy = llama_cpp.llama_sampler_init_greedy()

    def run(n: int) -> tuple[float, list[float]]:
        llm.reset()  # forget the previous run's tokens; eval() then clears their KV cache
        start, stamps = time.perf_counter(), []
        tokens = prompt
        for _ in range(n):
            llm.eval(tokens)
            tokens = [llama_cpp.llama_sampler_sample(greedy, llm.ctx, -1)]
            stamps.append(time.perf_counter())
        return start, stamps

    run(2)  # warm-up: pages the memory-mapped weights in and sizes llama.cpp's buffers
    start, stamps = run(new_tokens)
    ttft = stamps[0] - start
    llama_cpp.llama_sampler_free(greedy)
    return dict(load_s=load_s, compile_s=0.0, ttft_s=ttft, prefill_tok_s=prompt_len / ttft,
                decode_tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]), peak_host_mb=peak_host_mb(),
                peak_device_mb=None, load_peak_host_mb=load_peak, checkpoint_mb=Path(model_path).stat().st_size / 2**20,
                device="cpu", version=f"llama-cpp-python {llama_cpp.__version__}",
                gguf=model_path, extra_buffers=extra_buffers, system_info=system)


@contextlib.contextmanager
def model_params(**fields):
    """llama-cpp-python's Llama() sets only some of llama.cpp's model parameters; within this block
    the defaults it starts from carry `fields` too (e.g. use_extra_bufts=False)."""
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def with_fields():
        params = default()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    low.llama_model_default_params = with_fields
    try:
        yield
    finally:
        low.llama_model_default_params = default


if __name__ == "__main__":
    # the workers: `quantize SOURCE OUT TYPE THREADS`, and harness.run_engine's `llamacpp GGUF DTYPE PROMPT_LEN
    # NEW_TOKENS [threads=N] [quantize=...]` (the GGUF file already is the precision)
    if sys.argv[1] == "quantize":
        source, out, kind, threads = sys.argv[2:6]
        sys.exit(quantize(source, out, kind, int(threads)))
    from moecli.benchmark.harness import worker_args

    model_path, _, prompt_len, new_tokens, quantize, threads = worker_args(sys.argv)
    result = run_llamacpp(model_path, prompt_len, new_tokens, threads, quantized=quantize is not None)
    print(json.dumps({**result, "threads": threads}))
