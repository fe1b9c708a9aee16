"""Training checkpoints: one safetensors file per training configuration, written atomically, so a
checkpoint is whole or absent. Its tensors are every member's weights, optimizer state and
dead-latent counters; its metadata (`state`, JSON) holds the step, the config hash, the input scale
and the optimizer param groups. `members` are objects with `sae`, `opt` and `since_fired`
(training.TrainingMember).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write

_STATE_KEY = "state"


class CheckpointError(PipelineError, ValueError):
    """The checkpoint is unreadable or belongs to another training configuration."""


def save_checkpoint(path: Path, members: list, step: int, state: dict) -> None:
    """Weights, optimizer state and dead-latent counters of every member + JSON `state`, one file."""
    tensors = {}
    for i, m in enumerate(members):
        for name, t in m.sae.state_dict().items():
            tensors[f"{i}.sae.{name}"] = t
        opt_state = m.opt.state_dict()
        for pid, pstate in opt_state["state"].items():
            for key, value in pstate.items():
                tensors[f"{i}.opt.{pid}.{key}"] = torch.as_tensor(value)
        tensors[f"{i}.since_fired"] = m.since_fired
        state[f"param_groups.{i}"] = opt_state["param_groups"]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {_STATE_KEY: json.dumps({**state, "step": step})}
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})[_STATE_KEY])
            return meta, {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({err}); delete it to start this training over"
        ) from err


def load_checkpoint(path: Path, members: list, config_hash: str) -> dict | None:
    """Restore `members` from the checkpoint at `path`; None when there is none. Refuses another
    configuration's."""
    if not path.exists():
        return None
    meta, tensors = _read(path)
    if meta.get("config_hash") != config_hash:
        raise CheckpointError(
            f"{path} is a checkpoint of another training configuration (hash {meta.get('config_hash')}, "
            f"now {config_hash}); delete it to start over, or restore the settings it was made with"
        )
    for i, m in enumerate(members):
        m.sae.load_state_dict(
            {k.split(".sae.", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{i}.sae.")}
        )
        opt_state: dict = {"state": {}, "param_groups": meta[f"param_groups.{i}"]}
        for key, value in tensors.items():
            if key.startswith(f"{i}.opt."):
                _, _, pid, name = key.split(".", 3)
                opt_state["state"].setdefault(int(pid), {})[name] = value
        m.opt.load_state_dict(opt_state)
        m.since_fired.copy_(tensors[f"{i}.since_fired"])
    return meta


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint (and its folder, once empty)."""
    path.unlink(missing_ok=True)
    if path.parent.exists() and not any(path.parent.iterdir()):
        path.parent.rmdir()
