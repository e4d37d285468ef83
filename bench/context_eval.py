"""Can the bundled model run past its 256-token training length without losing held-out loss?

`weights/bardmoe` was trained on 256-token windows. This script measures, on the four held-out
plays, the mean next-token loss of the same weights under several ways of allowing 1,024
positions, none of which retrains anything:

- original:    the checkpoint as trained (RoPE, 256 positions); the reference, run at 256 only;
- extrapolate: plain RoPE, just allowed 1,024 positions (unseen rotation angles past 256);
- linear:      position interpolation (Chen et al. 2023): every position divided by 4, so 1,024
               positions span the angles of the 256 trained ones, at a quarter of the resolution;
- yarn:        YaRN (Peng et al. 2023), factor 4: the fast-rotating dimensions kept, the slow ones
               interpolated, attention sharpened by 0.1 ln 4 + 1 on both q and k;
- sliding:     plain RoPE with a 256-token sliding window (Mistral's attention): each layer sees
               the last 256 tokens only, so no distance is ever longer than in training, and
               older tokens reach a position only through the stacked layers.

The text: `--chunks` stretches of 1,025 held-out tokens, spread evenly over the plays. For each
window length L in 256, 512, 1024 every chunk is cut into 1024 / L non-overlapping windows, so
each length (and each variant) predicts the *same* 1,024 targets per chunk, with more or less
context before them. Losses are averaged per position bucket (positions 0-255, 256-511, 512-1023
of the window), with the standard error over chunks; the comparisons with the original at 256
are paired (the same targets), so their standard errors are those of the per-chunk differences.

A variant qualifies when, at L = 1024, neither its loss on all positions, nor on positions
256-1023, nor on positions 0-255 is worse than the original's at 256 on the same targets by more
than two standard errors.

    MOECLI_CACHE=/tmp/moecache python bench/context_eval.py            # the model card's table
    python bench/context_eval.py --chunks 16 --json /tmp/context.json  # quicker, and a JSON copy
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecli import load_model  # noqa: E402
from moecli.text.tokenizer import Tokenizer  # noqa: E402
from moecli.training import data  # noqa: E402
from moecli.training.losses import cross_entropy  # noqa: E402

TRAINED = 256                        # the training sequence length
LONG = 1024                          # the context to reach
LENGTHS = (256, 512, 1024)
BUCKETS = {"0-255": (0, 256), "256-511": (256, 512), "512-1023": (512, 1024), "256-1023": (256, 1024)}
BATCH_TOKENS = 8192                  # tokens per forward call (logits: 8192 x 2048 float32 = 64 MiB)

#: Each variant's changes to the trained config.json (rope_parameters is transformers 5's field;
#: moecli reads it too, and the old top-level rope_scaling, see families/common.py rope_from_hf).
VARIANTS = {
    "original": {"max_position_embeddings": TRAINED},
    "extrapolate": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": LONG / TRAINED}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "factor": LONG / TRAINED,
                                 "original_max_position_embeddings": TRAINED}},
    "sliding": {"sliding_window": TRAINED},
}


def variant_config(trained: dict, name: str) -> dict:
    """config.json of a variant: the trained config (plain RoPE, no window) at LONG positions,
    with the variant's changes. Starting from the *trained* settings lets this script run again
    after the bundled config.json has been given one of the variants."""
    theta = float(trained.get("rope_parameters", {}).get("rope_theta", trained.get("rope_theta", 1e4)))
    config = {**trained, "max_position_embeddings": LONG, "sliding_window": None, "rope_theta": theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    config.pop("rope_scaling", None)
    changes = json.loads(json.dumps(VARIANTS[name]))
    if "rope_parameters" in changes:
        changes["rope_parameters"]["rope_theta"] = theta
    return {**config, **changes}


def trained_config(model_dir: Path) -> dict:
    """The checkpoint's config.json as trained: rope reset to default, TRAINED positions."""
    config = json.loads((model_dir / "config.json").read_text())
    return variant_config(config, "original")


def make_variant(model_dir: Path, config: dict, folder: Path) -> Path:
    """A checkpoint folder with `config` as its config.json and every other file of model_dir
    symlinked (the weights are never copied, nor changed)."""
    folder.mkdir(parents=True)
    for file in model_dir.iterdir():
        if file.is_file() and file.name != "config.json":
            (folder / file.name).symlink_to(file.resolve())
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def held_out_chunks(model_dir: Path, n_chunks: int) -> np.ndarray:
    """[n_chunks, LONG + 1] int32: non-overlapping stretches of the held-out token stream (the
    plays of data.HELD_OUT, normalised and encoded as `moe train` does), spread evenly over it."""
    tokenizer = Tokenizer.from_dir(model_dir)
    _, valid = data.split_works(data.read_works())
    tokens = data.encode(tokenizer, [data.normalise_work(k, v) for k, v in valid.items()])
    available = (len(tokens) - 1) // LONG
    if not 1 < n_chunks <= available:
        raise SystemExit(f"--chunks must be between 2 and {available}, got {n_chunks}")
    picks = np.linspace(0, available - 1, n_chunks).round().astype(int)
    return np.stack([tokens[i * LONG:i * LONG + LONG + 1] for i in picks]).astype(np.int32)


def token_losses(model, chunks: np.ndarray, length: int) -> np.ndarray:
    """[n_chunks, LONG] float64: each target's loss when every chunk is cut into windows of
    `length` tokens (position j of a chunk sits at position j % length of its window)."""
    inputs = chunks[:, :-1].reshape(-1, length)
    targets = chunks[:, 1:].reshape(-1, length)
    per_batch = max(1, BATCH_TOKENS // length)
    losses = [np.asarray(cross_entropy(model(inputs[i:i + per_batch]), targets[i:i + per_batch]))
              for i in range(0, len(inputs), per_batch)]
    return np.concatenate(losses).astype(np.float64).reshape(len(chunks), LONG)


def bucket_means(losses: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """{bucket: per-chunk mean loss over the targets at those window positions}, "all" included;
    buckets the window does not reach are left out."""
    position = np.arange(LONG) % length
    means = {"all": losses.mean(axis=1)}
    for name, (lo, hi) in BUCKETS.items():
        if hi <= length:
            means[name] = losses[:, (position >= lo) & (position < hi)].mean(axis=1)
    return means


def mean_se(per_chunk: np.ndarray) -> tuple[float, float]:
    """The mean over chunks and its standard error."""
    return float(per_chunk.mean()), float(per_chunk.std(ddof=1) / np.sqrt(len(per_chunk)))


def verdict(results: dict, name: str) -> dict:
    """The paired differences from the original at 256 that decide whether `name` qualifies: at
    L = LONG, all targets, those at positions 256-1023 and those at 0-255, each against the
    original's loss on the same targets ("head"/"tail": the chunk's first 256 targets and the rest)."""
    ref, long = results["original"][TRAINED], results[name][LONG]
    checks = {"all": (long["all"], ref["all"]), "256-1023": (long["256-1023"], ref["tail"]),
              "0-255": (long["0-255"], ref["head"])}
    out = {}
    for bucket, (mine, theirs) in checks.items():
        diff, se = mean_se(mine - theirs)
        out[bucket] = {"diff": diff, "se": se, "ok": diff <= 2 * se}
    out["qualifies"] = all(c["ok"] for c in out.values())
    return out


def evaluate(model_dir: Path, n_chunks: int, names: list[str]) -> dict:
    """{variant: {length: {bucket: per-chunk means}}}; the original also gets "head" and "tail",
    its per-chunk loss on the chunk's first 256 targets and on the rest: the targets a LONG
    window holds at positions 0-255 and 256-1023."""
    chunks = held_out_chunks(model_dir, n_chunks)
    trained = trained_config(model_dir)
    results = {}
    with tempfile.TemporaryDirectory(prefix="context-eval-") as tmp:
        for name in names:
            config = trained if name == "original" else variant_config(trained, name)
            model = load_model(make_variant(model_dir, config, Path(tmp) / name), dtype="float32")
            lengths = (TRAINED,) if name == "original" else LENGTHS
            results[name] = {}
            for length in lengths:
                start = time.perf_counter()
                losses = token_losses(model, chunks, length)
                results[name][length] = bucket_means(losses, length)
                if name == "original":
                    results[name][length]["head"] = losses[:, :TRAINED].mean(axis=1)
                    results[name][length]["tail"] = losses[:, TRAINED:].mean(axis=1)
                print(f"  {name:<12} L={length:<5} {mean_se(results[name][length]['all'])[0]:.4f}"
                      f"  ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            del model
            jax.clear_caches()
    return results


def markdown(results: dict, n_chunks: int) -> str:
    """The loss table and the verdicts, in the model card's Markdown."""
    cols = ["all", "0-255", "256-511", "512-1023", "256-1023"]
    lines = [f"Mean loss (nats/token) ± standard error over {n_chunks} chunks of {LONG} held-out targets;"
             f" the same targets in every row.", "",
             "| variant | L | " + " | ".join(f"pos {c}" if c != "all" else "all" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, by_length in results.items():
        for length, means in by_length.items():
            cells = ["%.3f ± %.3f" % mean_se(means[c]) if c in means else "" for c in cols]
            lines.append(f"| {name} | {length} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences at L = {LONG} from the original at {TRAINED} on the same targets "
              "(negative = better; qualifies if none is worse by more than 2 SE):", "",
              "| variant | Δ all | Δ pos 256-1023 | Δ pos 0-255 | qualifies |", "|---|---|---|---|---|"]
    for name in results:
        if name == "original":
            continue
        v = verdict(results, name)
        cells = [f"{v[b]['diff']:+.3f} ± {v[b]['se']:.3f}" for b in ("all", "256-1023", "0-255")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if v['qualifies'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "weights" / "bardmoe")
    parser.add_argument("--chunks", type=int, default=32, help="stretches of 1,024 held-out targets")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the per-variant means and SEs here")
    args = parser.parse_args(argv)
    names = ["original"] + [n for n in args.variants.split(",") if n and n != "original"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    results = evaluate(args.model, args.chunks, names)
    print(markdown(results, args.chunks))
    if args.json:
        summary = {name: {str(length): {b: mean_se(m) for b, m in means.items()}
                          for length, means in by_length.items()} for name, by_length in results.items()}
        summary["verdicts"] = {name: verdict(results, name) for name in results if name != "original"}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
