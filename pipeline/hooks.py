"""Hook points: where in a model an activation is read or replaced, and the forward passes that do it.

Names are `blocks.<L>.<point>` with point one of HOOK_POINTS. Their meaning, for every supported
architecture (Llama/Mistral/Qwen/Gemma, GPT-2, GPT-NeoX):
    resid_pre  = input of decoder layer L           (= hidden_states[L] of HF)
    attn_out   = what attention adds to the stream   (after Gemma-2's post-attention norm)
    resid_mid  = resid_pre + attn_out                 (input of the pre-MLP norm)
    mlp_in     = the MLP's input: resid_mid after the pre-MLP norm, as the MLP sees it (transcoders read it)
    mlp_out    = what the MLP adds to the stream
    resid_post = output of decoder layer L           (= hidden_states[L+1], except the last layer,
                                                      where HF applies the final norm)
`capture_activations` runs a truncated forward: it stops as soon as the deepest requested hook fired.
`splice_activations` replaces an activation and lets the model compute on (`splice_transcoder`: the
one at one hook by a function of the one at an earlier hook); `record_prefix` /
`replay_prefix` / `clean_pass` let spliced passes skip the layers a splice cannot change.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import PipelineError

HOOK_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out")
RESIDUAL_POINTS = ("resid_pre", "resid_mid", "resid_post")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")


class HookError(PipelineError, ValueError):
    """A hook name is malformed or does not exist in this model."""


@dataclass(frozen=True)
class HookPoint:
    layer: int
    point: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.point}"

    @property
    def on_residual_stream(self) -> bool:
        """resid_pre / resid_mid / resid_post: the whole stream, not what one component adds to it."""
        return self.point in RESIDUAL_POINTS

    @property
    def at_layer_boundary(self) -> bool:
        """resid_pre / resid_post: the stream between two decoder layers, from which a forward pass
        can start (stored activations there stand in for every layer before)."""
        return self.point in ("resid_pre", "resid_post")


def parse_hook_name(name: str) -> HookPoint:
    """Parse `blocks.<L>.<point>`; raise HookError naming the expected form otherwise."""
    match = _HOOK_RE.match(name)
    if not match or match.group(2) not in HOOK_POINTS:
        raise HookError(
            f"invalid hook name {name!r}: expected 'blocks.<layer>.<point>' with point one of "
            f"{', '.join(HOOK_POINTS)} (e.g. 'blocks.6.resid_post')"
        )
    return HookPoint(int(match.group(1)), match.group(2))


# ---------------------------------------------------------------- hook points in a model

_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama-, GPT-2-, NeoX-, Gemma-style)."""
    for path in _LAYER_PATHS:
        module = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise HookError(
        f"cannot find the decoder layers of {type(model).__name__}; supported layouts: {', '.join(_LAYER_PATHS)}"
    )


def _child(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise HookError(f"{type(layer).__name__} has no {what} module (looked for {', '.join(names)})")


def resolve_hook(model: nn.Module, hook: HookPoint) -> tuple[nn.Module, str]:
    """Return (module, 'input' | 'output'): the hook's activation is that module's input or output."""
    layer = decoder_layers(model)[hook.layer]
    sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma-2/3: norms after attn and mlp too
    if hook.point == "resid_pre":
        return layer, "input"
    if hook.point == "resid_post":
        return layer, "output"
    if hook.point == "attn_out":
        if sandwich:
            return layer.post_attention_layernorm, "output"
        return _child(layer, ("self_attn", "attn", "attention"), "attention"), "output"
    if hook.point == "mlp_in":
        return _child(layer, ("mlp",), "MLP"), "input"
    if hook.point == "mlp_out":
        if sandwich:
            return layer.post_feedforward_layernorm, "output"
        return _child(layer, ("mlp",), "MLP"), "output"
    # resid_mid
    if getattr(getattr(model, "config", None), "use_parallel_residual", False):
        raise HookError(
            f"{hook.name}: this model adds attention and MLP in parallel, so there is no residual "
            "stream between them; use resid_pre, resid_post, attn_out or mlp_out"
        )
    names = ("pre_feedforward_layernorm",) if sandwich else ("post_attention_layernorm", "ln_2")
    return _child(layer, names, "pre-MLP norm"), "input"


def validate_hooks(model: nn.Module, names: list[str]) -> list[HookPoint]:
    """Parse and check hook names against this model; errors list the valid choices."""
    if not names:
        raise HookError("no hook points given; e.g. harvest.hooks=[blocks.6.resid_post]")
    n_layers = len(decoder_layers(model))
    hooks = []
    for name in names:
        hook = parse_hook_name(name)
        if hook.layer >= n_layers:
            raise HookError(
                f"hook {name!r}: layer {hook.layer} is out of range; this model has layers 0..{n_layers - 1} "
                f"(valid hooks: blocks.<0..{n_layers - 1}>.<{'|'.join(HOOK_POINTS)}>)"
            )
        resolve_hook(model, hook)
        hooks.append(hook)
    if len(set(hooks)) != len(hooks):
        raise HookError(f"duplicate hook names in {names}")
    return hooks


class _StopForward(Exception):
    """Raised by a capture hook once every requested activation has been taken."""


def _first(x):
    return x[0] if isinstance(x, tuple | list) else x


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (a truncated forward never needs the head)."""
    return getattr(model, "base_model", model)


def _hook_activation(module: nn.Module, side: str, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register a hook that passes the activation at a hook point (`module`'s input or output, as
    resolve_hook gives) to `fn`; when `fn` returns a tensor, it replaces the activation from there on."""
    if side == "input":

        def pre_hook(_mod, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(_mod, _args, output):
        new = fn(_first(output))
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple | list) else new

    return module.register_forward_hook(post_hook)


def capture_activations(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    hooks: list[HookPoint],
    inputs_embeds: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Truncated forward: {hook name: [batch, seq, d_model]}, stopping after the last needed module.
    `inputs_embeds` [batch, seq, d_model] replaces the token embedding (e.g. to take gradients)."""
    captured: dict[str, torch.Tensor] = {}

    def record(name: str, value: torch.Tensor) -> None:
        captured[name] = value
        if len(captured) == len(hooks):
            raise _StopForward

    handles = [
        _hook_activation(*resolve_hook(model, hook), lambda value, name=hook.name: record(name, value))
        for hook in hooks
    ]
    try:
        base_model(model)(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [h.name for h in hooks if h.name not in captured]
    if missing:
        raise HookError(f"hooks {missing} never fired during the forward pass of {type(model).__name__}")
    return captured


@contextlib.contextmanager
def watch_activation(model: nn.Module, hook: HookPoint | None) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends the activation at `hook` to the yielded list
    (without stopping the forward, unlike capture_activations); it stays empty for hook None."""
    seen: list[torch.Tensor] = []
    if hook is None:
        yield seen
        return
    handle = _hook_activation(*resolve_hook(model, hook), seen.append)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def splice_activations(
    model: nn.Module, hook: HookPoint, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, the activation at `hook` is replaced by `replace(activation)` in every
    forward pass, and the rest of the model computes on from the replacement (e.g. an SAE's x_hat)."""
    if hook.point == "resid_mid":
        with _splice_resid_mid(model, hook, replace):
            yield
        return
    handle = _hook_activation(*resolve_hook(model, hook), replace)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _splice_resid_mid(
    model: nn.Module, hook: HookPoint, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """resid_mid feeds both the MLP and the residual add after it, so replacing the pre-MLP norm's
    input alone would leave the residual branch clean. Instead the attention output is rewritten to
    replace(resid_pre + attn_out) - resid_pre, which makes the stream after the add the replacement."""
    layer = decoder_layers(model)[hook.layer]
    attn_module, _ = resolve_hook(model, HookPoint(hook.layer, "attn_out"))
    resid_pre: list[torch.Tensor] = []

    def keep_input(x: torch.Tensor) -> None:  # None: the layer's input stays as it is
        resid_pre[:] = [x]

    handles = [
        _hook_activation(layer, "input", keep_input),
        _hook_activation(attn_module, "output", lambda attn: replace(resid_pre[0] + attn) - resid_pre[0]),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def splice_transcoder(
    model: nn.Module,
    reads: HookPoint,
    writes: HookPoint,
    replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Within the block, the activation y at `writes` is replaced by `replace(x, y)`, x the activation
    at `reads` of the same forward pass (a transcoder standing in for the MLP reads mlp_in and writes
    mlp_out: replace = lambda x, _y: its prediction from x). `reads` must fire before `writes`."""
    with watch_activation(model, reads) as seen:

        def replace_seen(activation: torch.Tensor) -> torch.Tensor:
            if not seen:
                raise HookError(f"{writes.name} fired before {reads.name}: a transcoder reads an earlier hook than it writes")
            return replace(seen.pop(), activation)

        with splice_activations(model, writes, replace_seen):
            yield


def prefix_layers(hook: HookPoint) -> int:
    """How many leading decoder layers a splice at `hook` leaves untouched (their outputs are the
    clean ones, whatever is spliced): all layers before the hook's, and that one too for resid_post."""
    return hook.layer + 1 if hook.point == "resid_post" else hook.layer


@contextlib.contextmanager
def record_prefix(model: nn.Module, n_layers: int) -> Iterator[list]:
    """Keep the output of decoder layer `n_layers - 1` of the next forward pass (for `replay_prefix`)."""
    kept: list = []
    if n_layers == 0:
        yield kept
        return
    handle = decoder_layers(model)[n_layers - 1].register_forward_hook(
        lambda _mod, _args, output: kept.append(output)
    )
    try:
        yield kept
    finally:
        handle.remove()


@contextlib.contextmanager
def replay_prefix(model: nn.Module, n_layers: int, recorded: list) -> Iterator[None]:
    """Skip the first `n_layers` decoder layers in forward passes of the same input ids: each returns
    the recorded output of the last of them instead of computing (the layers after see exactly the
    clean stream). Saves their compute in every spliced pass after one clean pass."""
    layers = decoder_layers(model)[:n_layers]
    if n_layers and not recorded:
        raise RuntimeError("replay_prefix needs the output kept by record_prefix in a clean forward")
    for layer in layers:
        layer.forward = lambda *args, _out=recorded[-1], **kwargs: _out
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def clean_pass(
    model: nn.Module,
    hook: HookPoint,
    input_ids: torch.Tensor,
    stored: torch.Tensor | None = None,
    stored_prefix: list | None = None,
    **forward_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """A clean forward that keeps what spliced passes of the same input need: (logits, the activation
    at `hook` [batch, seq, d_model], the prefix record for replay_prefix). `stored`: the activations at
    a resid_pre / resid_post hook as this model computes them; then the layers before the hook are
    not computed either, and `stored_prefix` may pass the prefix record of an earlier such call."""
    n_prefix = prefix_layers(hook)
    if stored is None:
        with record_prefix(model, n_prefix) as kept, watch_activation(model, hook) as seen:
            logits = model(input_ids=input_ids, use_cache=False, **forward_kwargs).logits
        return logits, seen[0], kept
    if not hook.at_layer_boundary:
        raise ValueError(f"stored activations stand in for the layers before {hook.name} only at resid hooks")
    kept = stored_prefix
    if kept is None:
        with record_prefix(model, n_prefix) as kept:  # what the skipped layers return: only its type matters
            model(input_ids=input_ids[:1, :1], use_cache=False)
    x = stored.to(input_ids.device)
    with splice_activations(model, hook, lambda _a: x), replay_prefix(model, n_prefix, kept):
        logits = model(input_ids=input_ids, use_cache=False, **forward_kwargs).logits
    return logits, x, kept
