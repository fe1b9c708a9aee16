"""The dictionaries a stage works on, and the activations they go with: found in a run directory (or
named as directories), checked against the model, and hashed with what a stage's output depends on.
Used by every stage that reads trained dictionaries (evaluate, analyze, compare)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.hooks import HookPoint
from pipeline.models import LoadedModel
from pipeline.rundir import RunDir, config_hash, is_dictionary
from pipeline.sae import Sae
from pipeline.shards import ShardSet


class DictionaryError(PipelineError, ValueError):
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
    """Where it reads (and, an SAE, writes)."""

    @property
    def writes(self) -> str:
        """The hook its decoder writes at: a transcoder's hook_out, else the hook it reads."""
        return self.sae.meta["hook_out"] if self.sae.transcodes else self.hook


def _named_directories(run: RunDir | None, saes: list[str], stage: str) -> list[Path]:
    """The SAE directories `saes` names (directories, or names under <run>/sae/<hook>/); all of the
    run when empty. Without a run, only directories."""
    if run is None:
        missing = [entry for entry in saes if not is_dictionary(Path(entry))]
        if missing or not saes:
            raise DictionaryError(
                f"{stage}: {missing or 'nothing'} names no SAE directory (cfg.json + weights)"
            )
        return [Path(entry) for entry in saes]
    if not saes:
        found = run.dictionaries()
        if not found:
            raise DictionaryError(
                f"no dictionaries under {run.sae_root}; train one first (python -m pipeline train "
                f"run_dir={run.root}) or name SAE directories with {stage}.saes=[...]"
            )
        return found
    dirs = []
    for entry in saes:
        path = Path(entry)
        if not is_dictionary(path):
            matches = run.dictionaries(entry)
            if not matches:
                known = [p.name for p in run.dictionaries()]
                raise DictionaryError(
                    f"{stage}.saes: {entry!r} is neither an SAE directory nor a dictionary under "
                    f"{run.sae_root} (found: {known or 'none'})"
                )
            path = matches[0]
        dirs.append(path)
    return dirs


def find_dictionaries(
    run: RunDir | None, saes: list[str], hook: str | None, force: bool, stage: str
) -> list[Dictionary]:
    """The dictionaries named in `saes` (see _named_directories), each with the hook it is used at
    (`hook`, or the one its cfg.json names). `run`: where names are looked up (None: directories only)."""
    found = []
    for directory in _named_directories(run, saes, stage):
        sae = Sae.load(directory)
        own_hook = sae.meta.get("hook")
        used_at = hook or own_hook
        if used_at is None:
            raise DictionaryError(f"{directory}: cfg.json names no hook; set {stage}.hook=blocks.<L>.<point>")
        if sae.transcodes:
            _check_transcoder(sae, directory)
        if own_hook is not None and own_hook != used_at and not force:
            raise DictionaryError(
                f"{directory} was trained at {own_hook}, not at {stage}.hook={used_at}; using it elsewhere "
                f"is meaningless unless intended ({stage}.force=true)"
            )
        found.append(Dictionary(directory.name, directory, sae, used_at))
    return found


def _check_transcoder(sae: Sae, directory: Path) -> None:
    """A transcoder must name the activations it predicts (every stage splices or measures it there)."""
    if not sae.meta.get("hook_out"):
        raise DictionaryError(
            f"{directory}: a transcoder whose cfg.json names no hook_out (the activations it predicts); "
            'add e.g. "hook_out": "blocks.3.mlp_out" to it'
        )


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


def _vocabulary(tokenizer_id: str) -> str:
    """The vocabulary part of a tokenizer id (`<model>#vocab-<hash>`, models.py)."""
    return tokenizer_id.rpartition("#")[2]


def shards_for(run: RunDir, hook: str, loaded: LoadedModel) -> ShardSet:
    """The run's harvested activations at `hook`, checked to hold token ids of this model's vocabulary
    (the stored windows are then the same text for it: a fine-tuned copy of the run's model reads them)."""
    directory = run.activations(hook)
    if not directory.is_dir():
        raise DictionaryError(
            f"no harvested activations for {hook} in {run.location}: the stage reads its windows from them; "
            f"harvest them first: python -m pipeline harvest run_dir={run.location} harvest.hooks=[{hook}]"
        )
    shards = run.shards(hook)
    if _vocabulary(shards.manifest.tokenizer_id) != _vocabulary(loaded.tokenizer_id):
        raise DictionaryError(
            f"{shards.directory} was tokenized by {shards.manifest.tokenizer_id}, whose vocabulary differs from "
            f"this model's tokenizer {loaded.tokenizer_id}; use the model the run was harvested with (model=...)"
        )
    return shards


def stored_activations_match(shards: ShardSet, loaded: LoadedModel, hook: HookPoint) -> bool:
    """Whether the shards hold exactly what this model computes at `hook` (same weights, stored in
    its compute dtype), at a layer boundary that a forward pass can start from."""
    return (
        hook.at_layer_boundary
        and shards.manifest.weights_hash == loaded.weights_hash
        and shards.dtype == loaded.dtype
    )


def output_config_hash(sae: Sae, loaded: LoadedModel, shards: ShardSet, settings: dict) -> str:
    """The config hash of a stage's output for one dictionary: its weights, the model, the
    activations and the stage's settings."""
    return config_hash(
        {
            "sae": sae.digest(),
            "model": loaded.weights_hash,
            "shards": [r.sha256 for r in shards.manifest.shards],
            "settings": settings,
        }
    )


@dataclass
class OneDictionary:
    """Which single dictionary a stage works on (the shared part of the explain, relevance, steer and
    track settings)."""

    sae: str | None = None
    """A directory, or a name under <run_dir>/sae/<hook>/; null: the run's only dictionary."""
    hook: str | None = None
    """Use it at this hook; null: the one its cfg.json names."""
    force: bool = False
    """Use a dictionary trained on another model or at another hook anyway."""


def one_dictionary(run: RunDir, chosen: OneDictionary, stage: str, error: type[Exception]) -> Dictionary:
    """The single dictionary `chosen` names in `run`; `error` names the choices when there are several."""
    found = find_dictionaries(run, [chosen.sae] if chosen.sae else [], chosen.hook, chosen.force, stage)
    if len(found) != 1:
        raise error(
            f"{stage}.sae={chosen.sae} names {len(found)} dictionaries ({', '.join(d.name for d in found)}); "
            f"name one, e.g. {stage}.sae=" + (found[0].name if found else "batchtopk-k32-x16")
        )
    return found[0]
