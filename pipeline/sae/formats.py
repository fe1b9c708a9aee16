"""Read and write SAE directories in this project's format, SAELens' and EleutherAI sparsify's.

This project: cfg.json (with `format_version`) + sae.safetensors (W_enc [d_in, d_sae], b_enc, W_dec
[d_sae, d_in], b_dec, threshold). The other two, from their published code:

SAELens v6: cfg.json + sae_weights.safetensors with the same tensor names; `architecture` is
standard | topk | jumprelu (a BatchTopK or Matryoshka BatchTopK SAE is saved for inference as jumprelu). Encoding:
    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    standard: ReLU(pre);  topk: ReLU of the k largest (pre * ||W_dec,i|| with rescale_acts_by_decoder_norm);
    jumprelu: ReLU(pre) * (pre > threshold)
sparsify: cfg.json (activation, expansion_factor, num_latents, k, ...) + sae.safetensors with
encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec; encoding
pre = (x - b_dec) @ encoder.weight^T + encoder.bias, then the k largest of ReLU(pre). A transcoder
(transcode: true) subtracts no b_dec, and with skip_connection adds x @ W_skip^T (W_skip [d_out, d_in]).
SAELens' transcoders have ReLU or JumpReLU codes, never TopK ones, so ours export to sparsify only.

Every difference is folded into the weights on import, so codes and reconstructions are unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write
from pipeline.hooks import HookError, parse_hook_name
from pipeline.sae.base import CONFIG_FILE, WEIGHTS_FILE, Sae, SaeConfig, SaeConfigError, architectures

SAELENS_WEIGHTS = "sae_weights.safetensors"
_TL_PREFIX = "hook_"  # TransformerLens names the same points blocks.<L>.hook_<point>


class FormatError(PipelineError, ValueError):
    """A directory is not a readable SAE, or uses a feature this converter cannot represent."""


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise FormatError(
            f"{path} is not valid JSON ({err}); restore it from the dictionary's source"
        ) from err


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as err:
        raise FormatError(
            f"{path} is not a readable safetensors file ({err}); weights are read only as safetensors "
            "(never pickles): re-save or re-convert the dictionary"
        ) from err


def read_native(directory: Path) -> Sae:
    """A dictionary in this project's format (cfg.json + sae.safetensors)."""
    try:
        sae = Sae.from_config_dict(_json(directory / CONFIG_FILE))
        sae.load_file_tensors(_tensors(directory / WEIGHTS_FILE))
    except (SaeConfigError, KeyError, TypeError) as err:
        raise FormatError(f"{directory} does not hold a readable dictionary: {err}") from err
    return sae


def detect_format(directory: Path) -> str:
    """'native', 'saelens' or 'sparsify', from the files in `directory`."""
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        subdirs = sorted(p.name for p in directory.glob(f"*/{CONFIG_FILE}")) if directory.is_dir() else []
        hint = (
            f"; it has SAE subdirectories {[Path(s).parent.name for s in subdirs]}: pass one of them"
            if subdirs
            else ""
        )
        raise FileNotFoundError(
            f"{directory} holds no cfg.json: expected an SAE directory (cfg.json + sae.safetensors), "
            f"e.g. outputs/<run>/sae/<hook>/<name>{hint}"
        )
    if (directory / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} has cfg.json but neither sae.safetensors nor {SAELENS_WEIGHTS}")
    config = _json(cfg_path)
    if "format_version" in config and "architecture" in config:
        return "native"
    if "expansion_factor" in config or "num_latents" in config:
        return "sparsify"
    raise FormatError(f"{directory}/cfg.json is neither this project's, SAELens' nor sparsify's format")


def load_any(directory: Path, device: str | torch.device = "cpu") -> Sae:
    """Load the SAE in `directory`, whichever supported format it is in."""
    reader = {"native": read_native, "saelens": read_saelens, "sparsify": read_sparsify}[
        detect_format(directory)
    ]
    return reader(directory).to(device)


def _build(architecture: str, tensors: dict[str, torch.Tensor], k: int, meta: dict) -> Sae:
    d_sae, d_in = tensors["W_dec"].shape
    cls = architectures()[architecture]
    cfg = SaeConfig(architecture=architecture, d_sae=d_sae, skip="W_skip" in tensors, **({"k": k} if cls.uses_k else {}))
    with torch.device("meta"):  # no random initialisation for the file's tensors to overwrite
        sae = cls(cfg, d_in, meta)
    sae.to_empty(device="cpu")
    sae.load_file_tensors({name: t.float() for name, t in tensors.items()})  # every tensor: checked there
    return sae


# ---------------------------------------------------------------- SAELens


_TL_MLP_IN = "ln2.hook_normalized"  # TransformerLens' name of what the MLP reads (its hook_mlp_in is before the norm)


def _tl_hook(hook: str | None) -> str | None:
    """Our hook name in TransformerLens' spelling (names of another grammar pass unchanged)."""
    try:
        point = parse_hook_name(hook or "")
    except HookError:
        return hook
    return f"blocks.{point.layer}.{_TL_MLP_IN if point.point == 'mlp_in' else _TL_PREFIX + point.point}"


def _our_hook(tl_hook: str | None) -> str | None:
    """A TransformerLens hook name in our spelling (names of another grammar pass unchanged)."""
    # TransformerLens' hook_mlp_in is the stream before the pre-MLP norm: our resid_mid
    tl_hook = (tl_hook or "").replace(f".{_TL_MLP_IN}", ".mlp_in", 1).replace(".hook_mlp_in", ".resid_mid", 1)
    try:
        point = parse_hook_name(tl_hook.replace(f".{_TL_PREFIX}", ".", 1))
    except HookError:
        return tl_hook or None
    return point.name


def read_saelens(directory: Path) -> Sae:
    """An SAELens (v6, or older standard/topk) directory as a Sae acting on raw activations."""
    config = _json(directory / CONFIG_FILE)
    tensors = _tensors(directory / SAELENS_WEIGHTS)
    arch = config.get("architecture")
    if arch is None:  # SAELens < 6
        arch = (
            "topk" if config.get("activation_fn_str", config.get("activation_fn")) == "topk" else "standard"
        )
    k = config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k", 32)
    norm = config.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in", None):
        raise FormatError(
            f"{directory}: normalize_activations={norm!r} is a nonlinear runtime step; it cannot be folded into the weights"
        )
    if arch not in ("standard", "topk", "jumprelu"):
        raise FormatError(
            f"{directory}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu are)"
        )
    weights = {name: tensors[name].float() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if not config.get("apply_b_dec_to_input", True):
        # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        weights["b_enc"] = weights["b_enc"] + weights["b_dec"] @ weights["W_enc"]
    if arch == "topk" and config.get("rescale_acts_by_decoder_norm", False):
        norms = weights["W_dec"].norm(dim=1).clamp_min(1e-8)
        weights["W_enc"], weights["b_enc"], weights["W_dec"] = (
            weights["W_enc"] * norms,
            weights["b_enc"] * norms,
            weights["W_dec"] / norms[:, None],
        )
    if arch == "jumprelu":
        # ReLU(pre) * (pre > t) equals pre * (pre > max(t, 0))
        weights["threshold"] = tensors["threshold"].float().clamp_min(0)
    metadata = config.get("metadata") or config
    meta = {
        "model_id": metadata.get("model_name"),
        "hook": _our_hook(metadata.get("hook_name")),
        "converted_from": "saelens",
    }
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    return _build(ours, weights, int(k), meta)


def write_saelens(sae: Sae, directory: Path) -> Path:
    """Write `sae` as an SAELens v6 inference SAE (BatchTopK and Matryoshka BatchTopK become jumprelu,
    as SAELens saves them)."""
    if sae.transcodes:
        raise FormatError(
            "SAELens' transcoders compute ReLU or JumpReLU codes, and this transcoder's are TopK: no SAELens "
            "format computes them; export it to sparsify instead (--to sparsify)"
        )
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
            "matryoshka_batchtopk": "jumprelu"}[sae.architecture]  # fmt: skip
    config = {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.0.0",
            "sae_lens_training_version": "6.0.0",
            "model_name": sae.meta.get("model_id"),
            "hook_name": _tl_hook(sae.meta.get("hook")),
        },
    }
    if arch == "topk":
        config.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in sae.file_tensors().items()}
    atomic_write(directory / SAELENS_WEIGHTS, safetensors_bytes(tensors))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory


# ---------------------------------------------------------------- sparsify


_SPARSIFY_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")  # a transcoder's hookpoint: the MLP module of layer L


def read_sparsify(directory: Path) -> Sae:
    """A sparsify SparseCoder directory (TopK SAE, or transcoder with or without its skip term) as a Sae.
    A transcoder saved under its hookpoint `layers.<L>.mlp` (as sparsify does) reads blocks.L.mlp_in
    and predicts blocks.L.mlp_out."""
    config = _json(directory / CONFIG_FILE)
    if config.get("activation", "topk") != "topk":
        raise FormatError(
            f"{directory}: sparsify activation {config.get('activation')!r} is not supported (topk is)"
        )
    transcode = bool(config.get("transcode"))
    for flag in ("multi_topk", *(() if transcode else ("skip_connection",))):
        if config.get(flag):
            raise FormatError(
                f"{directory}: sparsify {flag}=true has no equivalent here; TopK SAEs and transcoders convert"
            )
    tensors = _tensors(directory / WEIGHTS_FILE)
    weights = {
        "W_enc": tensors["encoder.weight"].float().t().contiguous(),
        "b_enc": tensors["encoder.bias"].float(),
        "W_dec": tensors["W_dec"].float(),
        "b_dec": tensors["b_dec"].float(),
    }
    meta = {"converted_from": "sparsify"}
    if transcode and config.get("skip_connection"):
        weights["W_skip"] = tensors["W_skip"].float().t().contiguous()
    if transcode and (layer := _SPARSIFY_MLP.search(directory.name)):
        meta.update(hook=f"blocks.{layer.group(1)}.mlp_in", hook_out=f"blocks.{layer.group(1)}.mlp_out")
    return _build("transcoder" if transcode else "topk", weights, int(config.get("k", 32)), meta)


def write_sparsify(sae: Sae, directory: Path) -> Path:
    """Write a TopK `sae` or a transcoder as a sparsify SparseCoder directory."""
    if sae.architecture not in ("topk", "transcoder"):
        raise FormatError(f"sparsify stores TopK SAEs and transcoders only; this one is {sae.architecture!r}")
    skip = sae.transcodes and sae.cfg.skip
    config = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": True,
        "num_latents": sae.d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": sae.transcodes,
        "d_in": sae.d_in,
    }
    tensors = {
        "encoder.weight": sae.W_enc.detach().float().t().contiguous().cpu(),
        "encoder.bias": sae.b_enc.detach().float().cpu(),
        "W_dec": sae.W_dec.detach().float().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().float().cpu(),
        **({"W_skip": sae.W_skip.detach().float().t().contiguous().cpu()} if skip else {}),
    }
    atomic_write(directory / WEIGHTS_FILE, safetensors_bytes(tensors))
    atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory
