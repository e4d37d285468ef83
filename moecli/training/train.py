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

`run` shows every phase as it happens (`moecli.training.progress`): reading and tokenising the
corpus, building the CPU kernels and compiling the steps (done ahead of time, `compiled`, so no
step hides a compile), the steps, each validation, and the final validation and export.
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

from moecli import env
from moecli.checkpoints.export import save_checkpoint
from moecli.errors import UsageError
from moecli.kernels import registry
from moecli.model.config import ModelConfig, RopeConfig
from moecli.model.sizes import parameter_counts
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
from moecli.training.progress import Phases, step_header, step_row, training_bar
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

def prepare_data(tc: TrainConfig, out: Path, new_tokenizer: bool, phases):
    """(tokenizer, train tokens, validation tokens), each stage shown as a phase. The tokenizer is
    trained on the training works only (a tokenizer fitted to the held-out text would leak it)
    and saved in `out`."""
    from moecli.text.tokenizer import Tokenizer
    from moecli.training import data

    with phases("reading the corpus") as phase:
        train_works, valid_works = data.split_works(data.read_works(tc.data), tc.held_out)
        train_texts = [data.normalise_work(k, v) for k, v in train_works.items()]
        valid_texts = [data.normalise_work(k, v) for k, v in valid_works.items()]
        megabytes = sum(map(len, train_texts + valid_texts)) / 1e6
        phase.detail = f"{len(train_works)} works to train on, {len(valid_works)} held out, {megabytes:.1f} MB"
    if new_tokenizer or not (out / "tokenizer.model").is_file():
        with phases(f"training the tokenizer (sentencepiece BPE, {tc.vocab_size:,} tokens)"):
            data.train_tokenizer(train_texts, out, tc.vocab_size, model_max_length=tc.seq_len)
    with phases("tokenising") as phase:
        tokenizer = Tokenizer.from_dir(out)
        train_tokens, valid_tokens = data.encode(tokenizer, train_texts), data.encode(tokenizer, valid_texts)
        phase.detail = f"{len(train_tokens):,} tokens to train on, {len(valid_tokens):,} to validate"
    if len(train_tokens) < tc.seq_len + 2:
        raise UsageError(f"the training text has only {len(train_tokens)} tokens", "use more data or a shorter --seq-len")
    return tokenizer, train_tokens, valid_tokens


def start_kernels() -> bool:
    """On CPU, start building the C++ kernels in the background if this machine has not built them
    yet (~15 s, once), so the compiler runs while the corpus is read and tokenised. Returns
    whether a build was started (then `run` shows the wait for it as a phase)."""
    if jax.default_backend() != "cpu" or not env.switch("MOECLI_CPU_KERNELS"):
        return False
    from moecli.kernels.cpu import ffi

    building = not ffi.is_built()
    ffi.start_building()
    return building


def compiled(jitted, *args):
    """`jitted` compiled ahead of time for `args`' shapes, so compiling is a phase of its own
    instead of hiding inside the first step (the result runs only on arguments of those shapes)."""
    return jitted.lower(*args).compile()


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class Trained:
    """Where a run is: the parameters, the optimiser state, the step they are at, and counters."""

    params: dict
    opt_state: object
    step: int
    elapsed: float = 0.0          # seconds spent in training steps (not compiling or validating)
    tokens_seen: int = 0

    def save(self, out: Path, tc: TrainConfig, config: ModelConfig) -> None:
        """The training state in out/train_state/ (what --resume reads)."""
        save_state(out, self.step, self.params, self.opt_state, tc,
                   {"elapsed": self.elapsed, "tokens_seen": self.tokens_seen, "model_config": dataclasses.asdict(config)})


def train_steps(tc: TrainConfig, config: ModelConfig, at: Trained, train_step, eval_capacity, windows,
                train_tokens: np.ndarray, out: Path, console) -> None:
    """Steps from at.step to tc.steps under the step bar, updating `at`: a log record every 10
    steps, validation every eval_interval (a line of the step log), a checkpoint every
    checkpoint_interval. Ctrl-C saves the step reached and re-raises."""
    log_path = out / STATE_DIR / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        at.save(out, tc, config)
        save_checkpoint(out, at.params, config, tc.export_dtype)

    schedule, batch_tokens = learning_rate(tc), tc.batch_size * tc.seq_len
    recent: list[float] = []            # the last training losses, for a smoothed display
    speed_window: list[float] = []      # the last steps' seconds
    val_text, header_shown = "-", False
    bar = training_bar(console)
    try:
        with bar:
            task = bar.add_task("train", total=tc.steps, completed=at.step, loss="-", val="-", tps="-")
            for step in range(at.step, tc.steps):
                t0 = time.perf_counter()
                batch = jnp.asarray(sample_batch(train_tokens, step, tc.seed, tc.batch_size, tc.seq_len))
                at.params, at.opt_state, metrics = train_step(at.params, at.opt_state, batch)
                metrics = {k: float(v) for k, v in metrics.items()}
                dt = time.perf_counter() - t0
                at.step, at.elapsed, at.tokens_seen = step + 1, at.elapsed + dt, at.tokens_seen + batch_tokens
                if not math.isfinite(metrics["loss"]):
                    raise UsageError(f"the loss became {metrics['loss']} at step {step + 1}",
                                     "lower --lr or raise --warmup, then start again (or --resume from the last checkpoint)")
                recent = (recent + [metrics["ce"]])[-20:]
                speed_window = (speed_window + [dt])[-20:]
                tps = batch_tokens * len(speed_window) / sum(speed_window)
                done = at.step
                if done % 10 == 0 or done == tc.steps:
                    log({"step": done, **{k: round(v, 5) for k, v in metrics.items()},
                         "lr": float(schedule(step)), "tokens_per_s": round(tps, 1), "elapsed": round(at.elapsed, 2)})
                if done % tc.eval_interval == 0 or done == tc.steps:
                    result = evaluate(eval_capacity, at.params, windows,
                                      lambda i, n: bar.update(task, description=f"val {i}/{n}"))
                    bar.update(task, description="train")
                    val_text = f"{result['loss']:.3f}"
                    log({"step": done, "val_loss": result["loss"]})
                    if not header_shown:
                        bar.console.print(step_header(), style="bold", highlight=False)
                        header_shown = True
                    bar.console.print(step_row(done, np.mean(recent), result["loss"], metrics["aux"], metrics["z"],
                                               metrics["dropped"], tps, at.elapsed / 60), highlight=False)
                if done % tc.checkpoint_interval == 0 and done != tc.steps:
                    checkpoint()
                bar.update(task, completed=done, loss=f"{np.mean(recent):.3f}", val=val_text, tps=f"{tps:,.0f}")
    except KeyboardInterrupt:
        # Ctrl-C: keep the work done so far. (If the interrupt hit while the step was running, its
        # donated inputs are gone and the last periodic checkpoint stands.)
        try:
            checkpoint()
            console.print(f"[yellow]interrupted: saved step {at.step} in {out / STATE_DIR}; "
                          f"continue with: moe train --out {out} --resume")
        except (RuntimeError, ValueError):
            console.print("[yellow]interrupted: kept the last periodic checkpoint")
        raise


def run(tc: TrainConfig | None, out: str | Path, resume: bool = False, overrides: dict | None = None,
        console=None) -> dict:
    """Train `tc` into `out`, or (resume=True, tc None) continue the run saved in `out` with its saved
    settings, `overrides` changing those TrainConfig marks resumable (e.g. a later `steps`).
    Every phase is shown on `console` (`moecli.training.progress`). Returns the summary written
    to train_state/summary.json."""
    from rich.console import Console

    console = console or Console()
    phases = Phases(console)
    out = Path(out)
    state = None
    if resume:
        state = load_state(out)
        tc = resumed(state.train_config, overrides or {})
    elif has_state(out):
        raise UsageError(f"{out} already holds a training run", "pass --resume to continue it, or choose another --out")
    tc.validate()
    out.mkdir(parents=True, exist_ok=True)
    building_kernels = start_kernels()
    console.print(f"[bold]moe train[/]: {tc.n_layers} layers, d_model {tc.d_model}, {tc.n_experts} experts "
                  f"top-{tc.top_k}, float32 on {jax.default_backend()}, into {out}")
    if resume:
        console.print(f"resuming from step {state.step}")

    tokenizer, train_tokens, valid_tokens = prepare_data(tc, out, not resume, phases)
    config = model_config(tc, vocab_size=max(tc.vocab_size, tokenizer.vocab_size))
    optimizer = make_optimizer(tc)
    total, active, _ = parameter_counts(config)
    with phases(f"restoring step {state.step}" if state else
                f"initialising {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token)"):
        if state is not None:
            at = Trained(*restore(state, optimizer), state.step, state.extra.get("elapsed", 0.0),
                         state.extra.get("tokens_seen", 0))
        else:
            params = init_params(config, tc.seed)
            at = Trained(params, optimizer.init(params), 0)
    if building_kernels:
        with phases("building the CPU kernels (once per machine)"):
            registry.select()

    batch_tokens = tc.batch_size * tc.seq_len
    windows = eval_windows(valid_tokens, tc.batch_size, tc.seq_len, tc.eval_batches)
    example = jnp.asarray(windows[0])  # [batch_size, seq_len + 1], the shape of every batch
    if at.step < tc.steps:
        with phases("compiling the training step (once)"):
            train_step = compiled(make_train_step(config, tc, optimizer), at.params, at.opt_state, example)
    else:
        train_step = None
        console.print(f"[yellow]{out} is already trained to step {at.step} (--steps {tc.steps}); nothing to train")
    with phases("compiling the validation step (once per routing mode)"):
        eval_capacity = compiled(make_eval_step(config, batch_tokens), at.params, example)
        eval_dropless = compiled(make_eval_step(config.replace(capacity_factor=0.0), batch_tokens), at.params, example)

    train_steps(tc, config, at, train_step, eval_capacity, windows, train_tokens, out, console)
    with phases(f"saving the training state (step {at.step})"):
        at.save(out, tc, config)
    try:
        summary = final_report(tc, config, at.params, out, train_tokens, valid_tokens, eval_capacity, eval_dropless,
                               at.elapsed, at.tokens_seen, max(at.step, tc.steps), console, phases)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted: step {at.step} is saved; moe train --out {out} --resume runs the "
                      "final validation and the export")
        raise
    with phases(f"writing model.safetensors ({tc.export_dtype}) and config.json"):
        save_checkpoint(out, at.params, config, tc.export_dtype)
    console.print(f"{out} holds a Hugging Face checkpoint (weights, config, tokenizer); chat with it: moe chat -m {out}")
    return summary
