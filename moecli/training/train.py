"""Training a Mixture-of-Experts language model from scratch, on the same Haiku model moecli runs.

The recipe, each part explained where it is implemented:

* data: `moecli.training.data` turns the corpus into one token stream; each step samples `batch_size`
  random windows of `seq_len + 1` tokens (`sample_batch`), so every batch has the same shape
  and the jitted step compiles once. Inputs are a window's first seq_len tokens, targets the
  last seq_len (next-token prediction).
* loss: cross-entropy of the next token, plus two router losses (`load_balancing_loss`,
  `router_z_loss`) that keep the experts evenly used and the router's logits small.
* MoE in capacity mode (`ModelConfig.capacity_factor`, GShard/Switch): each expert processes at
  most C = ceil(capacity_factor * tokens * top_k / n_experts) tokens per batch; assignments
  beyond that are dropped. Fixed-size expert buffers are what makes MoE training efficient on
  accelerators; the price is dropped tokens when the router is unbalanced, which the
  load-balancing loss keeps rare. Inference (moecli's default) is dropless.
* optimiser (`make_optimizer`): AdamW, linear warmup then cosine decay, gradient clipping.
* validation: the loss on works held out whole (`moecli.training.data.HELD_OUT`), every `eval_interval`
  steps; at the end in both capacity and dropless mode, next to a unigram baseline.
* checkpoints (`save_state`): parameters, optimiser state and step in `OUT/train_state/`, so
  `--resume` continues exactly where training stopped; and a Hugging Face-format export
  (`moecli.checkpoints.export`) in OUT itself, loadable by `moe chat -m OUT` or transformers.

Everything runs in float32: on CPU, bfloat16 matmuls are slower, and float32 keeps the small
gradients of the router exact. The export is cast to bfloat16 at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moecli.errors import UsageError
from moecli.kernels import registry
from moecli.model.config import ModelConfig, RopeConfig
from moecli.model.transformer import transformed
from moecli.training.config import TrainConfig, resumed
from moecli.training.evaluation import (
    LOG_FILE,
    eval_windows,
    evaluate,
    final_report,
    make_eval_step,
)
from moecli.training.losses import (  # noqa: F401 (re-exported)
    cross_entropy,
    dropped_fraction,
    expert_fractions,
    load_balancing_loss,
    router_z_loss,
)
from moecli.training.state import STATE_DIR, has_state, load_state, restore, save_state


def model_config(tc: TrainConfig, vocab_size: int | None = None) -> ModelConfig:
    """The Mixtral-shaped ModelConfig trained: every layer MoE, top-k gates renormalised."""
    return ModelConfig(
        family="mixtral", vocab_size=vocab_size or tc.vocab_size, d_model=tc.d_model, n_layers=tc.n_layers,
        n_heads=tc.n_heads, n_kv_heads=tc.n_kv_heads, head_dim=tc.head_dim, d_ff=0, d_expert=tc.d_expert,
        n_experts=tc.n_experts, top_k=tc.top_k, moe_layers=(True,) * tc.n_layers, norm_topk_prob=True,
        capacity_factor=tc.capacity_factor, rope=RopeConfig(theta=tc.rope_theta), norm_eps=1e-5,
        max_position_embeddings=tc.seq_len, bos_token_id=1, eos_token_ids=(2,))


# ----------------------------------------------------------------------------- initialisation

def init_params(config: ModelConfig, seed: int) -> dict:
    """Haiku's initialisers, with two corrections for training from scratch.

    * Experts: Haiku computes the fan-in of a stacked [n_experts, d, f] weight as
      n_experts * d, which would start every expert sqrt(n_experts) too small; each expert is a
      separate d -> f matrix, so we draw it with std 1/sqrt(d) (1/sqrt(f) for the down
      projection).
    * Residual branches: the output projections that write into the residual stream (attention
      o_proj and the experts' down projection) are scaled by 1/sqrt(2 * n_layers), as in GPT-2,
      so the stream's variance does not grow with depth at initialisation.
    """
    residual = 1.0 / math.sqrt(2 * config.n_layers)

    def normal(key, shape, std):  # truncated at 2 std, rescaled so the std is `std`
        return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * (std / 0.87962566)

    @jax.jit  # one compiled program, instead of one per initialiser call
    def init(key):
        params = transformed(config).init(key, jnp.zeros((1, 8), jnp.int32))
        params = {module: dict(group) for module, group in params.items()}  # mutable copies
        for i in range(config.n_layers):
            key, k1, k2, k3 = jax.random.split(key, 4)
            layer = f"transformer/layer_{i}"
            params[f"{layer}/attn/o_proj"]["w"] = params[f"{layer}/attn/o_proj"]["w"] * residual
            moe = params[f"{layer}/moe"]
            moe["w_gate"] = normal(k1, moe["w_gate"].shape, config.d_model ** -0.5)
            moe["w_up"] = normal(k2, moe["w_up"].shape, config.d_model ** -0.5)
            moe["w_down"] = normal(k3, moe["w_down"].shape, config.d_expert ** -0.5 * residual)
        return params

    return init(jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- optimiser

def learning_rate(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine decay to lr * min_lr_ratio at
    the last step. Warmup lets Adam's moment estimates settle before steps get large; the cosine
    tail lowers the noise of the last updates, which is where most of the final loss comes from."""
    warmup = min(tc.warmup, max(tc.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warmup, decay_steps=max(tc.steps, warmup + 1),
        end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Gradient clipping to a global norm of `clip_norm`, then AdamW.

    * Clipping rescales the whole gradient when its norm exceeds the limit, so one unlucky batch
      (or a router flip that reroutes many tokens at once) cannot throw the weights far.
    * AdamW (Loshchilov & Hutter 2019) is Adam with weight decay applied to the weights
      directly, not through the gradient; it decays matrices only, not RMSNorm scales (decaying a
      norm's scale towards 0 would just fight the norm). beta2 = 0.95, common for transformers,
      makes the second-moment estimate react faster to gradient spikes.
    """
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(learning_rate(tc), b1=0.9, b2=0.95, eps=1e-8, weight_decay=tc.weight_decay, mask=decay_mask),
    )


# ----------------------------------------------------------------------------- steps

def make_train_step(config: ModelConfig, tc: TrainConfig, optimizer: optax.GradientTransformation):
    """The jitted step: (params, opt_state, batch [B, T+1]) -> (params, opt_state, metrics).
    Parameters and optimiser state are donated, so XLA updates them in place."""
    apply = transformed(config, ops=registry.select()).apply  # kernels forward, pure-JAX gradients
    capacity = config.capacity(tc.batch_size * tc.seq_len) if config.capacity_factor > 0 else None

    def loss_fn(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, _, routing = apply(params, inputs)
        ce = jnp.mean(cross_entropy(logits, targets))
        aux = load_balancing_loss(routing.logits, routing.experts)
        z = router_z_loss(routing.logits)
        loss = ce + tc.aux_loss_coef * aux + tc.z_loss_coef * z
        dropped = (dropped_fraction(routing.experts, capacity, config.n_experts).mean()
                   if capacity is not None else jnp.zeros(()))
        return loss, {"loss": loss, "ce": ce, "aux": aux, "z": z, "dropped": dropped}

    def step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def sample_batch(tokens: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> np.ndarray:
    """`batch_size` random windows of seq_len + 1 tokens. The generator is seeded by (seed, step),
    so a resumed run sees exactly the batches the uninterrupted run would have."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)


# ----------------------------------------------------------------------------- data

def prepare_data(tc: TrainConfig, out: Path, new_tokenizer: bool):
    """(tokenizer, train tokens, validation tokens). The tokenizer is trained on the training
    works only (a tokenizer fitted to the held-out text would leak it) and saved in `out`."""
    from moecli.text.tokenizer import Tokenizer
    from moecli.training import data

    works = data.read_works(tc.data)
    train_works, valid_works = data.split_works(works, tc.held_out)
    train_texts = [data.normalise_work(k, v) for k, v in train_works.items()]
    valid_texts = [data.normalise_work(k, v) for k, v in valid_works.items()]
    if new_tokenizer or not (out / "tokenizer.model").is_file():
        data.train_tokenizer(train_texts, out, tc.vocab_size, model_max_length=tc.seq_len)
    tokenizer = Tokenizer.from_dir(out)
    train_tokens, valid_tokens = data.encode(tokenizer, train_texts), data.encode(tokenizer, valid_texts)
    if len(train_tokens) < tc.seq_len + 2:
        raise UsageError(f"the training text has only {len(train_tokens)} tokens", "use more data or a shorter --seq-len")
    return tokenizer, train_tokens, valid_tokens


# ----------------------------------------------------------------------------- the loop

def run(tc: TrainConfig | None, out: str | Path, resume: bool = False, overrides: dict | None = None,
        console=None) -> dict:
    """Train `tc` into `out`, or (resume=True, tc None) continue the run saved in `out` with its saved
    settings, `overrides` changing those TrainConfig marks resumable (e.g. a later `steps`).
    Returns the summary written to train_state/summary.json."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from moecli.checkpoints.export import save_checkpoint

    console = console or Console()
    out = Path(out)
    state = None
    if resume:
        state = load_state(out)
        tc = resumed(state.train_config, overrides or {})
    elif has_state(out):
        raise UsageError(f"{out} already holds a training run", "pass --resume to continue it, or choose another --out")
    tc.validate()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer, train_tokens, valid_tokens = prepare_data(tc, out, new_tokenizer=not resume)
    config = model_config(tc, vocab_size=max(tc.vocab_size, tokenizer.vocab_size))
    dropless = config.replace(capacity_factor=0.0)
    optimizer = make_optimizer(tc)
    if state is not None:
        params, opt_state = restore(state, optimizer)
        start, elapsed, tokens_seen = state.step, state.extra.get("elapsed", 0.0), state.extra.get("tokens_seen", 0)
        if start >= tc.steps:
            console.print(f"[yellow]{out} is already trained to step {start} (--steps {tc.steps}); nothing to do")
    else:
        params = init_params(config, tc.seed)
        opt_state = optimizer.init(params)
        start, elapsed, tokens_seen = 0, 0.0, 0
    total, active = config.parameter_counts()
    console.print(f"[bold]moe train[/] {out}: {tc.n_layers} layers, d_model {tc.d_model}, {tc.n_experts} experts "
                  f"top-{tc.top_k}, {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)")
    console.print(f"data: {len(train_tokens):,} training tokens, {len(valid_tokens):,} validation tokens "
                  f"(held out: {', '.join(tc.held_out)}); vocab {config.vocab_size}")
    if resume:
        console.print(f"resuming from step {start}")

    train_step = make_train_step(config, tc, optimizer)
    batch_tokens = tc.batch_size * tc.seq_len
    eval_capacity = make_eval_step(config, batch_tokens)
    eval_dropless = make_eval_step(dropless, batch_tokens)
    windows = eval_windows(valid_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)
    log_path = out / STATE_DIR / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint(step: int) -> None:
        save_state(out, step, params, opt_state, tc, {"elapsed": elapsed, "tokens_seen": tokens_seen,
                                                       "model_config": dataclasses.asdict(config)})
        save_checkpoint(out, params, config, tc.export_dtype)

    schedule = learning_rate(tc)
    recent: list[float] = []            # the last training losses, for a smoothed display
    speed_window: list[tuple[float, int]] = []
    val_text = "-"
    progress = Progress(
        TextColumn("[bold blue]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("val {task.fields[val]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False)
    completed = start  # the step the parameters are at
    try:
        with progress:
            task = progress.add_task("train", total=tc.steps, completed=start, loss="-", val="-", tps="-")
            for step in range(start, tc.steps):
                t0 = time.perf_counter()
                batch = jnp.asarray(sample_batch(train_tokens, step, tc.seed, tc.batch_size, tc.seq_len))
                params, opt_state, metrics = train_step(params, opt_state, batch)
                completed = step + 1
                metrics = {k: float(v) for k, v in metrics.items()}
                dt = time.perf_counter() - t0
                elapsed += dt
                tokens_seen += batch_tokens
                if not math.isfinite(metrics["loss"]):
                    raise UsageError(f"the loss became {metrics['loss']} at step {step + 1}",
                                     "lower --lr or raise --warmup, then start again (or --resume from the last checkpoint)")
                recent = (recent + [metrics["ce"]])[-20:]
                if step > start:  # the first step of a session includes compiling
                    speed_window = (speed_window + [(dt, batch_tokens)])[-20:]
                tps = (sum(n for _, n in speed_window) / sum(t for t, _ in speed_window)) if speed_window else 0.0
                done = step + 1
                if done % 10 == 0 or done == tc.steps:
                    log({"step": done, **{k: round(v, 5) for k, v in metrics.items()},
                         "lr": float(schedule(step)), "tokens_per_s": round(tps, 1), "elapsed": round(elapsed, 2)})
                if done % tc.eval_interval == 0 or done == tc.steps:
                    result = evaluate(eval_capacity, params, windows)
                    val_text = f"{result['loss']:.3f}"
                    log({"step": done, "val_loss": result["loss"]})
                    progress.console.print(
                        f"step {done:>6}  train {np.mean(recent):.4f}  val {result['loss']:.4f}  "
                        f"aux {metrics['aux']:.3f}  z {metrics['z']:.2f}  dropped {100 * metrics['dropped']:.1f}%  "
                        f"{tps:,.0f} tok/s  {elapsed / 60:.1f} min")
                if done % tc.checkpoint_interval == 0 and done != tc.steps:
                    checkpoint(done)
                progress.update(task, completed=done, loss=f"{np.mean(recent):.3f}", val=val_text, tps=f"{tps:,.0f}")
    except KeyboardInterrupt:
        # Ctrl-C: keep the work done so far. (If the interrupt hit while the step was running, its
        # donated inputs are gone and the last periodic checkpoint stands.)
        try:
            checkpoint(completed)
            console.print(f"[yellow]interrupted: saved step {completed} in {out / STATE_DIR}; "
                          f"continue with: moe train --out {out} --resume")
        except (RuntimeError, ValueError):
            console.print("[yellow]interrupted: kept the last periodic checkpoint")
        raise

    final_step = max(start, tc.steps)
    checkpoint(final_step)
    summary = final_report(tc, config, params, out, train_tokens, valid_tokens, eval_capacity, eval_dropless,
                           elapsed, tokens_seen, final_step, console)
    return summary
