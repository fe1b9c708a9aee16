"""Training checkpoints: safetensors for every tensor (weights, optimizer state, dead-latent
counters), JSON for the rest (step, config hash, input scale, optimizer param groups).

`members` are objects with `sae`, `opt` and `since_fired` (training.TrainingMember).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.fileio import atomic_write


class CheckpointError(ValueError):
    """The checkpoint belongs to another training configuration."""


def save_checkpoint(directory: Path, members: list, step: int, state: dict) -> None:
    """Weights, optimizer state and dead-latent counters of every member + JSON `state` (atomically)."""
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
    payload = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write(directory / "state.safetensors", payload)
    atomic_write(directory / "state.json", json.dumps({**state, "step": step}, indent=2).encode())


def load_checkpoint(directory: Path, members: list, config_hash: str) -> dict | None:
    """Restore `members` from `directory`; None when there is no checkpoint. Refuses another config."""
    meta_path = directory / "state.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("config_hash") != config_hash:
        raise CheckpointError(
            f"{directory} is a checkpoint of another training configuration (hash {meta.get('config_hash')}, "
            f"now {config_hash}); delete it to start over, or restore the settings it was made with"
        )
    tensors = load_file(directory / "state.safetensors")
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


def remove_checkpoint(directory: Path) -> None:
    for name in ("state.safetensors", "state.json"):
        (directory / name).unlink(missing_ok=True)
    if directory.exists() and not any(directory.iterdir()):
        directory.rmdir()
