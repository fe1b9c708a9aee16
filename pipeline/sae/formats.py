"""Find and read SAE directories: this project's format (SAELens and sparsify come via convert.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.sae.base import Sae


def load_any(directory: Path, device: str | torch.device = "cpu") -> Sae:
    """Load the SAE in `directory`, whichever supported format it is in."""
    if not (directory / "cfg.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no cfg.json: expected an SAE directory (cfg.json + sae.safetensors), "
            "e.g. outputs/<run>/sae/<hook>/<name>"
        )
    if (directory / "sae.safetensors").is_file():
        return Sae._load_native(directory, device)
    raise FileNotFoundError(f"{directory} has cfg.json but no sae.safetensors")
