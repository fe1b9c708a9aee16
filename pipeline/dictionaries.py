"""The dictionaries of a run directory and the activations they go with, found and checked for the
stages that use trained dictionaries (evaluate, analyze)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.models import LoadedModel
from pipeline.sae import Sae
from pipeline.shards import ShardError, ShardSet
from pipeline.train import CHECKPOINT_DIR


class DictionaryError(ValueError):
    """A dictionary or its activations do not fit the run; the message says how to fix it."""


@dataclass
class DictionarySelection:
    """Which dictionaries a stage uses (the shared part of the evaluate and analyze settings)."""

    saes: list[str] = field(default_factory=list)
    """SAE directories, or names under <run_dir>/sae/<hook>/; empty = every dictionary of the run."""
    hook: str | None = None
    """Use them at this hook; null = the hook each dictionary's cfg.json names."""
    force: bool = False
    """Use dictionaries trained on another model or at another hook anyway."""


@dataclass
class Dictionary:
    name: str
    directory: Path
    sae: Sae
    hook: str


def is_dictionary(path: Path) -> bool:
    return path.is_dir() and (path / "cfg.json").is_file() and path.name != CHECKPOINT_DIR


def find_dictionaries(
    run_dir: Path, saes: list[str], hook: str | None, force: bool, stage: str
) -> list[Dictionary]:
    """The dictionaries named in `saes` (names under <run_dir>/sae/<hook>/ or directories; all of the
    run when empty), each with the hook it is used at (`hook`, or the one its cfg.json names)."""
    sae_root = run_dir / "sae"
    if saes:
        dirs = []
        for entry in saes:
            path = Path(entry)
            if not is_dictionary(path):
                matches = sorted(p for p in sae_root.glob(f"*/{entry}") if is_dictionary(p))
                if not matches:
                    known = sorted(p.name for p in sae_root.glob("*/*") if is_dictionary(p))
                    raise DictionaryError(
                        f"{stage}.saes: {entry!r} is neither an SAE directory nor a dictionary under {sae_root} "
                        f"(found: {known or 'none'})"
                    )
                path = matches[0]
            dirs.append(path)
    else:
        dirs = sorted(p for p in sae_root.glob("*/*") if is_dictionary(p))
        if not dirs:
            raise DictionaryError(
                f"no dictionaries under {sae_root}; train one first (python -m pipeline train run_dir={run_dir}) "
                "or name SAE directories with {stage}.saes=[...]"
            )
    found = []
    for directory in dirs:
        sae = Sae.load(directory)
        own_hook = sae.meta.get("hook")
        used_at = hook or own_hook
        if used_at is None:
            raise DictionaryError(f"{directory}: cfg.json names no hook; set {stage}.hook=blocks.<L>.<point>")
        if own_hook is not None and own_hook != used_at and not force:
            raise DictionaryError(
                f"{directory} was trained at {own_hook}, not at {stage}.hook={used_at}; using it elsewhere "
                f"is meaningless unless intended ({stage}.force=true)"
            )
        found.append(Dictionary(directory.name, directory, sae, used_at))
    return found


def check_model(dictionaries: list[Dictionary], loaded: LoadedModel, force: bool, stage: str) -> None:
    """Each dictionary must read this model's width, and come from this model unless forced."""
    for d in dictionaries:
        if d.sae.d_in != loaded.d_model:
            raise DictionaryError(
                f"{d.directory} expects inputs of width d_in={d.sae.d_in}, but {loaded.model_id} has "
                f"d_model={loaded.d_model}; use it with the model it was trained on (model=...)"
            )
        own = d.sae.meta.get("model_id")
        if own is not None and own != loaded.model_id and not force:
            raise DictionaryError(
                f"{d.directory} was trained on {own!r}, but the model is {loaded.model_id!r}; "
                f"pick its model (model=...), or {stage}.force=true to use it with this one anyway"
            )


def shards_for(run_dir: Path, hook: str, loaded: LoadedModel) -> ShardSet:
    try:
        shards = ShardSet(run_dir / "activations" / hook)
    except (ShardError, FileNotFoundError) as err:
        raise DictionaryError(
            f"no harvested activations for {hook} in {run_dir} ({err}); the stage reads its windows "
            f"from them: python -m pipeline harvest run_dir={run_dir} "
            f"harvest.hooks=[{hook}]"
        ) from err
    if shards.manifest.tokenizer_id != loaded.tokenizer_id:
        raise DictionaryError(
            f"{shards.directory} was tokenized by {shards.manifest.tokenizer_id}, not by this model's "
            f"tokenizer {loaded.tokenizer_id}; use the model the run was harvested with (model=...)"
        )
    return shards


def stored_activations_match(shards: ShardSet, loaded: LoadedModel, hook: str) -> bool:
    """Whether the shards hold exactly what this model computes at `hook` (same weights, stored in
    its compute dtype), at a residual hook that a forward pass can start from."""
    return (
        hook.rsplit(".", 1)[-1] in ("resid_pre", "resid_post")
        and shards.manifest.weights_hash == loaded.weights_hash
        and shards.dtype == loaded.dtype
    )


def output_config_hash(sae: Sae, loaded: LoadedModel, shards: ShardSet, settings: dict) -> str:
    """What a stage's output for one dictionary depends on (its weights, the model, the activations
    and the stage's settings), as a short hash stored with the output to skip identical re-runs."""
    payload = {
        "sae": sae.digest(),
        "model": loaded.weights_hash,
        "shards": [r.sha256 for r in shards.manifest.shards],
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
