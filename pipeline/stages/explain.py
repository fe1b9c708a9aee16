"""Explain stage: a sentence for each analyzed feature, written and scored by a language model.

    python -m pipeline explain run_dir=outputs/demo explain.sae=batchtopk-k32-x8 explain.features=100
    python -m pipeline explain ... explain.backend=endpoint explain.endpoint=http://localhost:8000/v1 \\
        explain.endpoint_model=<served model>                     # vLLM, llama.cpp's server, ...

For a sample of the analyzed dashboard's firing features (explain.features, null: all), the explainer
(`explainer_model`, the packaged SmolLM2-135M-Instruct by default, or an OpenAI-compatible endpoint)
writes one sentence from the feature's top examples; a judge (the same model) scores it by detection
and fuzzing on the feature's examples across its activation range and on stored windows where it never
fires (explanations.py), next to two references: the tokens it fires on most, and another feature's
explanation. Writes explanations.json beside the dashboard and data/explanations.js into it (the index
gets a searchable explanation column, each feature page its explanation and scores), and a W&B table.
A re-run keeps the features already explained with the same explainer, prompt and settings.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.dashboard import INDEX_FILE, fires_on, load_features, load_vocab, write_explanations
from pipeline.dictionaries import Dictionary, DictionaryError, OneDictionary, one_dictionary
from pipeline.explainers import EndpointLanguageModel, LanguageModel, LocalLanguageModel
from pipeline.explanations import (
    PROMPT_VERSION,
    Text,
    detection_messages,
    explanation_messages,
    fuzzing_items,
    fuzzing_messages,
    judged,
    record_texts,
    token_list,
)
from pipeline.fileio import atomic_write
from pipeline.models import ModelConfig, load_model
from pipeline.rundir import RunDir
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

REPORT = "explanations.json"
KINDS = ("explainer", "tokens", "random")  # the explanation scored: the model's, the token list, another feature's


class ExplainError(DictionaryError):
    """The explanations cannot be made as configured; the message says what to change."""


@dataclass
class ExplainConfig(OneDictionary):
    features: int | None = 100
    """Features explained: a random sample of the firing ones (null: every firing one)."""
    backend: str = "local"
    """local (explainer_model, through transformers) | endpoint (an OpenAI-compatible server)."""
    endpoint: str = "http://localhost:8000/v1"
    endpoint_model: str = ""
    explain_examples: int = 10
    """Top examples the explainer sees."""
    score_examples: int = 6
    """Activating texts each score uses (from the quantile groups, none shown to the explainer), and as
    many texts where the feature never fires."""
    negative_windows: int = 128
    """Stored windows searched for texts where a feature never fires."""
    max_tokens: int = 30
    batch_size: int = 8
    seed: int = 0
    force: bool = False
    """Also re-explain every feature (not only those explained with other settings)."""
    progress: bool = True

    def __post_init__(self) -> None:
        check_settings(self, "explain", ExplainError, positive=("features", "explain_examples", "score_examples",
                       "negative_windows", "max_tokens", "batch_size"), choices={"backend": ("local", "endpoint")})  # fmt: skip
        if self.backend == "endpoint" and not self.endpoint_model:
            raise ExplainError("explain.backend=endpoint needs explain.endpoint_model=<the model the server serves>")


def _language_model(explainer: ModelConfig, cfg: ExplainConfig) -> LanguageModel:
    if cfg.backend == "endpoint":
        return EndpointLanguageModel(cfg.endpoint, cfg.endpoint_model)
    return LocalLanguageModel(load_model(explainer), cfg.batch_size)


def _chosen(records: list[dict], cfg: ExplainConfig) -> list[int]:
    """The firing features with enough examples, sampled (seeded) down to explain.features."""
    firing = [r["id"] for r in records if not r["silent"] and len(r["top"]) >= 2]
    rng = random.Random(cfg.seed)
    return sorted(rng.sample(firing, min(cfg.features, len(firing)))) if cfg.features else firing


def _scoring_texts(record: dict, vocab: list[str], cfg: ExplainConfig) -> list[Text]:
    """Activating texts across the activation range (the quantile groups', else top examples the explainer
    did not see), up to explain.score_examples, spread over the groups."""
    groups = [g["examples"] for g in record.get("quantile_groups") or [] if g["examples"]]
    spread = [e for column in itertools.zip_longest(*groups) for e in column if e is not None]
    pool = spread if groups else record["top"][cfg.explain_examples :]
    return record_texts(pool[: cfg.score_examples], vocab)


def _silent_texts(run: RunDir, d: Dictionary, features: list[int], vocab: list[str], cfg: ExplainConfig,
                  length: int) -> dict[int, list[Text]]:  # fmt: skip
    """Per feature, explain.score_examples texts of `length` tokens in which it never fires: stretches of
    stored windows (a frequent feature fires somewhere in every window, not in every stretch)."""
    shards = run.shards(d.hook)
    windows = min(cfg.negative_windows, shards.manifest.n_sequences)
    columns = torch.tensor(features)
    fired, tokens = [], []
    with torch.no_grad():
        for w in range(windows):
            ids, acts = shards.sequence(w)
            fired.append(d.sae.encode(acts.float())[:, columns] > 0)  # [ctx, features]
            tokens.append(ids)
    counts = torch.nn.functional.pad(torch.stack(fired).cumsum(1), (0, 0, 1, 0))  # [windows, ctx + 1, features]
    quiet = counts[:, length:] == counts[:, :-length]  # [windows, starts, features]: no firing in [s, s + length)
    quiet[:, 0] = False  # a text starts after BOS
    rng = random.Random(cfg.seed)
    out = {}
    for j, f in enumerate(features):
        candidates = torch.nonzero(quiet[:, :, j].any(1)).flatten().tolist()
        picked = rng.sample(candidates, min(cfg.score_examples, len(candidates)))
        starts = [rng.choice(torch.nonzero(quiet[w, :, j]).flatten().tolist()) for w in picked]
        out[f] = [Text([vocab[i] for i in tokens[w][s : s + length].tolist()], [0.0] * length)
                  for w, s in zip(picked, starts, strict=True)]  # fmt: skip
    return out


def _scores(lm: LanguageModel, explanation: str, positives: list[Text], negatives: list[Text], rng: random.Random) -> dict:
    """Detection and fuzzing of one explanation (explanations.judged for each)."""
    detection = [(t, 1) for t in positives] + [(t, 0) for t in negatives]
    fuzzing = fuzzing_items(positives, rng)
    said = lm.yes_probability([detection_messages(explanation, t) for t, _ in detection]
                              + [fuzzing_messages(explanation, m) for m, _ in fuzzing])  # fmt: skip
    return {"detection": judged(said[: len(detection)], [y for _, y in detection]),
            "fuzzing": judged(said[len(detection) :], [y for _, y in fuzzing])}  # fmt: skip


def _identity(lm: LanguageModel, cfg: ExplainConfig) -> dict:
    """What an explanation depends on: a re-run keeps those made with the same."""
    keep = ("explain_examples", "score_examples", "negative_windows", "max_tokens", "seed")
    return {"explainer": lm.identity, "prompt_version": PROMPT_VERSION, **{k: getattr(cfg, k) for k in keep}}


def _earlier(path: Path, identity: dict, force: bool) -> dict[int, dict]:
    """The features explained by an earlier run with the same identity."""
    if force or not path.exists():
        return {}
    report = json.loads(path.read_text())
    return {int(k): v for k, v in report["features"].items()} if report.get("identity") == identity else {}


def _explain(lm: LanguageModel, records: dict[int, dict], features: list[int], vocab: list[str],
             cfg: ExplainConfig) -> dict[int, dict]:  # fmt: skip
    """The explainer's sentence and the token list of each feature."""
    out = {}
    for f in tqdm(features, desc="explain", unit="feature", disable=not cfg.progress):
        shown = record_texts(records[f]["top"][: cfg.explain_examples], vocab)
        out[f] = {"explainer": lm.write(explanation_messages(shown), cfg.max_tokens) or "(nothing)",
                  "tokens": token_list(fires_on(records[f], vocab))}  # fmt: skip
    return out


def _score_all(lm: LanguageModel, explained: dict[int, dict], records: dict[int, dict], negatives: dict,
               vocab: list[str], cfg: ExplainConfig) -> None:  # fmt: skip
    """Score each feature's three explanations (in place); the random one is another feature's."""
    rng = random.Random(cfg.seed)
    ids = sorted(explained)
    others = ids[1:] + ids[:1]  # a derangement: every feature gets another's explanation
    for f, other in tqdm(list(zip(ids, others, strict=True)), desc="score", unit="feature", disable=not cfg.progress):
        entry = explained[f]
        entry["random"] = explained[other]["explainer"] if other != f else "(no other feature)"
        positives = _scoring_texts(records[f], vocab, cfg)
        entry["scores"] = {kind: _scores(lm, entry[kind], positives, negatives[f], rng) for kind in KINDS}


def summarize(explained: dict[int, dict]) -> dict:
    """Mean accuracy and AUROC of each explanation kind and score over the features (NaN left out)."""
    out = {}
    for kind in KINDS:
        for score in ("detection", "fuzzing"):
            for key in ("accuracy", "auroc"):
                values = [e["scores"][kind][score][key] for e in explained.values()]
                values = [v for v in values if v == v]
                out[f"{kind}/{score}_{key}"] = sum(values) / len(values) if values else float("nan")
    return out


def explain_features(explainer: ModelConfig, cfg: ExplainConfig, run_dir: str | Path,
                     wandb_cfg: WandbConfig | None = None) -> Path:  # fmt: skip
    """Explain and score the configured dictionary's analyzed features; return explanations.json."""
    run = RunDir.open(run_dir)
    d = one_dictionary(run, cfg, "explain", ExplainError)
    directory = run.features(d.hook, d.name)
    if not (directory / INDEX_FILE).exists():
        raise ExplainError(f"{d.hook}/{d.name} is not analyzed: run `python -m pipeline analyze run_dir={run.location}` first")
    _, records = load_features(directory)
    vocab, by_id = load_vocab(directory), {r["id"]: r for r in records}
    features = _chosen(records, cfg)
    lm = _language_model(explainer, cfg)
    identity, path = _identity(lm, cfg), directory / REPORT
    explained = _earlier(path, identity, cfg.force)
    todo = [f for f in features if f not in explained]
    log.info("explaining %d features of %s/%s with %s (%d kept from an earlier run)", len(todo), d.hook, d.name,
             lm.identity, len(features) - len(todo))  # fmt: skip
    if todo:
        fresh = _explain(lm, by_id, todo, vocab, cfg)
        length = len(by_id[todo[0]]["top"][0]["ids"])
        negatives = _silent_texts(run, d, todo, vocab, cfg, length)
        _score_all(lm, fresh, by_id, negatives, vocab, cfg)
        explained.update(fresh)
    report = {"sae": d.name, "hook": d.hook, "identity": identity, "summary": summarize(explained),
              "features": {str(f): explained[f] for f in sorted(explained)}}  # fmt: skip
    atomic_write(path, json.dumps(report, indent=1).encode())
    page_data = {f: {"explanation": e["explainer"], "detection": e["scores"]["explainer"]["detection"]["auroc"],
                     "fuzzing": e["scores"]["explainer"]["fuzzing"]["auroc"]} for f, e in explained.items()}  # fmt: skip
    for written in (path, write_explanations(directory, page_data)):
        run.upload(written)
    _log_wandb(report, run, wandb_cfg)
    s = report["summary"]
    log.info("detection AUROC %.3f (tokens %.3f, random %.3f), fuzzing AUROC %.3f (tokens %.3f, random %.3f) -> %s",
             s["explainer/detection_auroc"], s["tokens/detection_auroc"], s["random/detection_auroc"],
             s["explainer/fuzzing_auroc"], s["tokens/fuzzing_auroc"], s["random/fuzzing_auroc"], path)  # fmt: skip
    return path


def _log_wandb(report: dict, run: RunDir, wandb_cfg: WandbConfig | None) -> None:
    tracker = Tracker(wandb_cfg or WandbConfig(), run.root, "explain", {"explain": report["identity"]},
                      group=run.location, detail=f"{report['sae']}")  # fmt: skip
    tracker.table("explanations", [
        {"id": int(f), "explanation": e["explainer"], "tokens": e["tokens"],
         **{f"{kind}/{score}_auroc": e["scores"][kind][score]["auroc"] for kind in KINDS for score in ("detection", "fuzzing")}}
        for f, e in report["features"].items()])  # fmt: skip
    tracker.summary(report["summary"])
    tracker.finish()


def run(cfg: DictConfig, hook: str | None = None, sae: str | None = None) -> Path:
    """The explain stage on a composed Hydra config (`hook` / `sae`: this dictionary, as `all` asks)."""
    settings = to_dataclass(ExplainConfig, cfg.explain)
    if sae is not None:
        settings = replace(settings, hook=hook, sae=sae)
    return explain_features(to_dataclass(ModelConfig, cfg.explainer_model), settings, cfg.run_dir,
                            to_dataclass(WandbConfig, cfg.wandb))  # fmt: skip


main = stage_main("explain", run)
