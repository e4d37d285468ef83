"""Seeing the experts at work: which experts each token was routed to, how evenly the load spreads,
and switching experts off.

The decoder records, for every token it feeds (prompt and reply), the experts and gate weights
the router chose in each MoE layer (`Decoder.capture_routing`). From that:
- `token_pieces` splits the text into each token's own piece, and `without_stop_token` leaves out
  the end-of-sequence token a reply stops at (it is fed to the model, but is not part of the reply);
- `routing_records` gives the JSON written by `moe generate --routing-json FILE`;
- `token_view` colours each token of a reply by its top expert in one layer (without colour, it
  writes the expert after each token);
- `load_table` is a per-layer heat map of each expert's share of the assignments, with the load
  imbalance max/mean (1.0 is perfectly even; a load-balancing loss in training pushes towards it);
- `parse_mask` turns "LAYER:EXPERT" specs into the decoder's ablation mask. A switched-off expert
  gets router logit -inf: tokens are re-routed among the remaining experts (renormalised), never
  dropped.
"""
from __future__ import annotations

import numpy as np
from rich.table import Table
from rich.text import Text

from moecli.model.config import ModelConfig
from moecli.errors import UsageError

# A control character a model emits is shown as its symbol (U+2400...), never sent to the terminal.
CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}

# 16 distinguishable colours; expert e gets PALETTE[e % 16].
PALETTE = ["red", "green", "yellow", "blue", "magenta", "cyan", "bright_red", "bright_green",
           "bright_yellow", "bright_blue", "bright_magenta", "bright_cyan", "orange3", "purple", "turquoise2",
           "deep_pink3"]


def moe_layer_numbers(config: ModelConfig) -> list[int]:
    """The model layer number of each MoE layer (dense layers have no router)."""
    return [i for i, is_moe in enumerate(config.moe_layers) if is_moe]


def parse_mask(specs: list[str], config: ModelConfig) -> dict[int, set[int]]:
    """["3:5", "0:1"] -> {moe_index: {expert}}; layers are model layer numbers."""
    layers = moe_layer_numbers(config)
    disabled: dict[int, set[int]] = {}
    for spec in specs:
        try:
            layer, expert = (int(part) for part in spec.split(":"))
        except ValueError:
            raise UsageError(f"bad expert mask {spec!r}", "write LAYER:EXPERT, e.g. 3:5") from None
        if layer not in layers:
            raise UsageError(f"layer {layer} has no experts to mask",
                             f"MoE layers: {layers[0]}..{layers[-1]}" if layers else "this model has no MoE layers")
        if not 0 <= expert < config.n_experts:
            raise UsageError(f"expert {expert} does not exist", f"experts are 0..{config.n_experts - 1}")
        disabled.setdefault(layers.index(layer), set()).add(expert)
    return disabled


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text, special tokens included ("<s>"); the pieces add up to
    `tokenizer.decode(ids, skip_special_tokens=False)`.

    A piece is what the token adds to the text decoded so far, so a newline is the newline
    token's piece. A character split over several tokens (byte-level BPE, or sentencepiece byte
    fallback) is the piece of the token that completes it; the others get "". A run of byte-fallback
    tokens that is not valid UTF-8 decodes as a whole (one U+FFFD per byte): once that shows, the
    run's text becomes the piece of the token that ends it. Decoding restarts after each complete
    non-byte token, which it keeps as context (a decode drops its first token's leading space),
    so the cost is O(len(ids)), not quadratic."""
    def decode(window):
        return tokenizer.decode(window, skip_special_tokens=False)

    pieces: list[str] = []
    start, first, head = 0, 0, ""  # decode ids[start:]; ids[start:first] is context, whose text is `head`
    for i, token in enumerate(ids):
        pieces.append("")
        text = decode(ids[start:i + 1])
        if text.endswith("\ufffd") and i + 1 < len(ids):
            continue  # an incomplete character: it belongs to a later token
        pending, given = text[len(head):], "".join(pieces[first:i])
        if pending.startswith(given):
            pieces[i] = pending[len(given):]
        else:  # an invalid byte run: its text replaces what its first bytes were given
            pieces[first:i] = [""] * (i - first)
            pieces[i] = pending
        if token not in tokenizer.byte_ids:
            start, first, head = i, i + 1, decode([token])
    return pieces


def without_stop_token(ids: list[int], tokenizer) -> int:
    """How many of a reply's tokens to show: all but a final end-of-sequence token (`</s>`)."""
    return len(ids) - 1 if ids and ids[-1] in tokenizer.eos_ids else len(ids)


def routing_records(ids: list[int], pieces: list[str], routing: list, config: ModelConfig,
                    n_prompt: int) -> dict:
    """JSON-ready routing of every token: its id, text piece, and per MoE layer experts + weights."""
    layers = moe_layer_numbers(config)
    tokens = []
    for i, (token, piece, (experts, weights)) in enumerate(zip(ids, pieces, routing)):
        tokens.append({"index": i, "id": int(token), "text": piece, "prompt": i < n_prompt,
                       "layers": [{"layer": layer, "experts": experts[j].tolist(),
                                   "weights": [round(float(w), 6) for w in weights[j]]}
                                  for j, layer in enumerate(layers)]})
    return {"model_layers": config.n_layers, "moe_layers": layers, "n_experts": config.n_experts,
            "top_k": config.top_k, "tokens": tokens}


def token_view(pieces: list[str], routing: list, config: ModelConfig, layer: int, colour: bool = True) -> Text:
    """The tokens' text, each coloured by its top expert in model layer `layer`, and the colours'
    legend; without colour (NO_COLOR, or not a terminal), each token followed by "‹expert›"
    (before the line break, for a newline token)."""
    layers = moe_layer_numbers(config)
    if layer not in layers:
        raise UsageError(f"layer {layer} has no experts", f"choose one of the MoE layers {layers[0]}..{layers[-1]}")
    j = layers.index(layer)
    top = [int(experts[j][0]) for _, (experts, _) in zip(pieces, routing)]
    pieces = [piece.translate(CONTROL_PICTURES) for piece in pieces]
    if not colour:
        text = Text(f"layer {layer}, top expert after each token (↵ is a newline):\n")
        for piece, e in zip(pieces, top):
            body = piece.rstrip("\n")
            breaks = piece[len(body):]
            text.append(f"{body}{'↵' if breaks else ''}‹{e}›{breaks}")
        return text
    text = Text()
    for piece, e in zip(pieces, top):
        text.append(piece, style=f"bold {PALETTE[e % len(PALETTE)]}")
    text.append(f"\nlayer {layer}, top expert per token: ")
    for e in sorted(set(top)):
        text.append(f" {e} ", style=f"reverse {PALETTE[e % len(PALETTE)]}")
    return text


def expert_load(routing: list, config: ModelConfig) -> np.ndarray:
    """[moe_layers, n_experts] share of the tokens' assignments each expert received."""
    counts = np.zeros((len(moe_layer_numbers(config)), config.n_experts))
    for experts, _ in routing:
        for j, chosen in enumerate(experts):
            np.add.at(counts[j], chosen, 1)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def heat(x: float) -> str:
    """A dark-to-bright blue background for x in [0, 1]."""
    level = int(40 + 200 * x)
    return f"white on rgb({level // 4},{level // 3},{level})"


def load_table(routing: list, config: ModelConfig, scope: str, max_columns: int = 64) -> Table:
    """Heat map: one row per MoE layer, one cell per expert (darker = more load), and max/mean.
    `scope` says which tokens `routing` covers, e.g. "prompt + reply"."""
    load = expert_load(routing, config)
    shown = min(config.n_experts, max_columns)
    table = Table(title=f"expert load over {len(routing)} tokens ({scope}), % of assignments", box=None,
                  padding=(0, 1))
    table.add_column("layer", justify="right")
    for e in range(shown):
        table.add_column(str(e), justify="center", min_width=3)
    table.add_column(" max/mean", justify="right")
    for j, layer in enumerate(moe_layer_numbers(config)):
        row, peak = load[j], load[j].max() or 1.0
        cells = [Text(f"{100 * v:2.0f}", style=heat(v / peak)) for v in row[:shown]]
        imbalance = row.max() / row.mean() if row.mean() else 0.0
        table.add_row(str(layer), *cells, f" {imbalance:.2f}")
    if shown < config.n_experts:
        table.caption = f"first {shown} of {config.n_experts} experts shown"
    return table


def device_table(routing: list, config: ModelConfig, n_devices: int, itemsize: int, scope: str,
                 device_names: list[str] | None = None) -> Table:
    """With experts sharded over devices: per device, the experts it holds, its parameter bytes and
    how many of the tokens' assignments it served (summed over the MoE layers)."""
    from moecli.hub.progress import human_bytes
    from moecli.model.sizes import placement

    per_device = config.n_experts // n_devices
    served = np.zeros(n_devices, int)
    for experts, _ in routing:
        np.add.at(served, (np.asarray(experts) // per_device).reshape(-1), 1)
    table = Table(title=f"experts over {n_devices} devices: assignments served in {len(routing)} tokens ({scope})",
                  box=None)
    for column in ("device", "experts", "bytes", "assignments", "share"):
        table.add_column(column, justify="left" if column in ("device", "experts") else "right")
    total = max(served.sum(), 1)
    for d, p in enumerate(placement(config, n_devices, itemsize, device_names)):
        table.add_row(p.device, f"{p.experts[0]}..{p.experts[1]}", human_bytes(p.total_bytes), str(served[d]),
                      f"{100 * served[d] / total:.0f}%")
    return table


def routing_views(routing: list, config: ModelConfig, scope: str, mesh=None, itemsize: int = 4) -> list:
    """The load heat map, plus the per-device table when the experts are sharded; `scope` names
    the tokens `routing` covers ("prompt + reply", "reply")."""
    views = [load_table(routing, config, scope)]
    if mesh is not None:
        devices = list(mesh.devices.flat)
        views.append(device_table(routing, config, len(devices), itemsize, scope,
                                  [f"{d.platform}:{d.id}" for d in devices]))
    return views
