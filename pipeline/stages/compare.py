"""Compare stage: how two dictionaries at the same hook differ — the main case being one trained on a
base model θ₀ and one on a fine-tuned θ_f.

    python -m pipeline compare base=outputs/demo other=outputs/demo-finetuned control=outputs/demo-control \
        model@other_model=hub other_model.path=outputs/demo-finetuned/model

  matching     decoder cosine similarity between every pair of features; the optimal one-to-one
               assignment (Hungarian) and each feature's best match. A base feature is kept
               (assigned cos >= compare.kept), shifted (>= compare.shifted) or vanished; an other
               feature without a partner above compare.shifted is new. Encoder cosines of the pairs too.
  transfer     each dictionary evaluated on both models (FVU, L0, CE loss recovered, KL): does the
               old explanation still hold after fine-tuning?
  control      (compare.control) the same matching of a dictionary trained as `other` but on the base
               model: what training alone moves; the base features that moved only against `other`
  drift        for assigned pairs: firing frequency on each run's activations and the overlap of
               their top-activating examples (same corpus windows).
Writes `<run_dir>/compare/report.json`, `matches.safetensors` (per feature), `index.html` (the most
changed features, linked into both runs' dashboards), and logs to W&B.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import save

from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.dashboard import index_rows, link_report
from pipeline.dashboard.pages import comparison_page
from pipeline.dictionaries import Dictionary, DictionaryError, find_dictionaries
from pipeline.evaluation import EvaluationSettings, evaluate_dictionaries, held_out, summary_row
from pipeline.feature_matching import STATUS_NAMES, against_control, classify, match_features
from pipeline.feature_stats import FeaturePassSettings, feature_pass
from pipeline.fileio import atomic_write, remove_stale_temporaries
from pipeline.locks import exclusive
from pipeline.models import ModelConfig, load_model, resolve_device
from pipeline.remote import is_remote
from pipeline.rundir import RunDir, is_dictionary
from pipeline.splits import leading_windows
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)



class CompareError(DictionaryError):
    """The comparison cannot run as configured; the message says how to fix it."""


@dataclass
class CompareConfig:
    base: str = ""
    """Run directory (or SAE directory inside one) of the base model θ₀."""
    other: str = ""
    """Run directory (or SAE directory inside one) of the other model, e.g. the fine-tuned θ_f."""
    control: str | None = None
    """Run directory (or SAE directory) of a control: a dictionary trained as `other` was but on the
    base model (e.g. the base dictionary continued with train.init_from on θ₀'s own activations, or
    another seed). Its counts against base say how much any such training moves the features, the
    model unchanged; null: none (the log warns that the counts then mix both)."""
    sae: str | None = None
    """Dictionary name under sae/<hook>/ when a run holds several."""
    kept: float = 0.8
    """Assigned decoder cosine at or above which a feature counts as kept."""
    shifted: float = 0.5
    """... at or above which it counts as shifted; below, vanished (base) or new (other)."""
    transfer: bool = True
    """Evaluate each dictionary on both models."""
    eval_tokens: int | None = 8192
    """Held-out tokens per transfer evaluation."""
    tokens: int | None = 262144
    """Tokens of each run's activations for firing frequencies and top examples."""
    top_k: int = 10
    """Top examples per feature whose overlap measures drift."""
    top_changed: int = 50
    """Features listed in index.html."""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.base or not self.other:
            raise CompareError(
                "set base=<run or SAE dir> and other=<run or SAE dir> (compare.base / compare.other)"
            )
        check_settings(self, "compare", CompareError, positive=("eval_tokens", "tokens", "top_k"),
                       non_negative=("top_changed",))  # fmt: skip
        if not 0 <= self.shifted <= self.kept <= 1:
            raise CompareError(
                f"need 0 <= compare.shifted ({self.shifted}) <= compare.kept ({self.kept}) <= 1"
            )


@dataclass
class _Side:
    run: RunDir | None  # None: a dictionary directory outside any run
    dictionary: Dictionary


def _side(path: str, sae: str | None, role: str) -> _Side:
    p = Path(path)
    if not is_remote(path) and is_dictionary(p):
        run = RunDir.of_dictionary(p)
        return _Side(run, find_dictionaries(run, [str(p)], None, False, "compare")[0])
    run = RunDir.open(path)
    found = find_dictionaries(run, [sae] if sae else [], None, False, "compare")
    if len(found) != 1:
        names = [f"{d.hook}/{d.name}" for d in found]
        raise CompareError(
            f"compare.{role}={path} holds {len(found)} dictionaries {names}; pick one with compare.sae=<name>"
        )
    return _Side(run, found[0])


def _drift(sides: dict[str, _Side], cfg: CompareConfig, device) -> dict[str, dict] | None:
    """Frequency and top examples of every feature on its own run's activations."""
    if any(side.run is None for side in sides.values()):
        return None
    settings = FeaturePassSettings(top_k=cfg.top_k, samples=1, progress=cfg.progress)
    out = {}
    for role, side in sides.items():
        shards = side.run.shards(side.dictionary.hook)
        ctx = shards.manifest.context_length
        n = leading_windows(shards.manifest.n_sequences, ctx, cfg.tokens)
        passed = feature_pass(side.dictionary.sae.to(device), shards, n, settings, device)
        out[role] = {
            "frequency": passed.frequency(),
            "top": passed.top.token.cpu(),
            # top examples are comparable only where both runs hold the very same token windows
            "windows": hashlib.sha256(shards.tokens_at(torch.arange(n * ctx)).numpy().tobytes()).hexdigest(),
        }
    return out


def _overlap(top_b: torch.Tensor, top_o: torch.Tensor) -> float:
    a, b = set(top_b[top_b >= 0].tolist()), set(top_o[top_o >= 0].tolist())
    return len(a & b) / max(1, min(len(a), len(b))) if a and b else float("nan")


_TRANSFER_KEYS = ("l0", "fvu", "ce_loss_score", "kl_div_with_sae", "ce_loss_with_sae", "ce_loss_without_sae")


def _transfer(sides: dict[str, _Side], models: dict[str, ModelConfig], cfg: CompareConfig) -> dict:
    """Both dictionaries on both runs (each run's own model and held-out windows)."""
    settings = EvaluationSettings(tokens=cfg.eval_tokens, progress=cfg.progress)
    results = {}
    for run_role, side in sides.items():
        if side.run is None:
            continue
        loaded = load_model(models[run_role])
        hook = side.dictionary.hook
        group = [
            Dictionary(f"{role}-dictionary", s.dictionary.directory, s.dictionary.sae, hook)
            for role, s in sides.items()
        ]
        evaluated = evaluate_dictionaries(
            loaded, held_out(loaded, side.run, hook, group, settings), group, settings
        )
        for dict_role in sides:
            row = summary_row(evaluated[f"{dict_role}-dictionary"][0])
            results[f"{dict_role}_dictionary_on_{run_role}_model"] = {k: row[k] for k in _TRANSFER_KEYS}
        del loaded
    return results


def _dashboard_link(out: Path, side: _Side, feature: int) -> str | None:
    """The href, from `out`, of a feature's page in its run's dashboard (None where there is none)."""
    if side.run is None:
        return None
    page = side.run.feature_page(side.dictionary.hook, side.dictionary.name)
    return f"{os.path.relpath(page, out)}#{feature}" if page.exists() else None


def _index_rows(side: _Side) -> dict[int, dict]:
    """A side's dashboard index rows by feature id ({} where its dictionary is not analyzed)."""
    return index_rows(side.run.features(side.dictionary.hook, side.dictionary.name)) if side.run else {}


ROW_COLUMNS = ("base", "assigned", "status", "decoder_cos", "encoder_cos", "best_other", "best_cos",
               "frequency", "overlap", "control_cos")  # fmt: skip


def _most_changed(
    matches: dict, classes: dict, drift: dict | None, overlap: torch.Tensor, n: int, control_cos: torch.Tensor | None
) -> list[dict]:
    """The n base features with the lowest assigned decoder cosine, one row each (ROW_COLUMNS); with a
    control, those whose cosine fell furthest below the control's (moved most beyond it)."""
    rows = []
    cos = matches["assigned_cos"].nan_to_num(-1.0)
    if control_cos is not None:
        cos = cos - control_cos.nan_to_num(-1.0)
    for f in torch.argsort(cos)[:n].tolist():
        g = int(matches["assigned"][f])
        frequency = None
        if drift is not None and g >= 0:
            frequency = [float(drift["base"]["frequency"][f]), float(drift["other"]["frequency"][g])]
        rows.append(
            {
                "base": f,
                "assigned": g,
                "status": STATUS_NAMES[int(classes["status"][f])],
                "decoder_cos": float(matches["assigned_cos"][f]),
                "encoder_cos": float(matches["encoder_cos"][f]),
                "best_other": int(matches["best"][f]),
                "best_cos": float(matches["best_cos"][f]),
                "frequency": frequency,
                "overlap": None if overlap[f].isnan() else float(overlap[f]),
                "control_cos": None if control_cos is None else float(control_cos[f]),
            }
        )
    return rows


def _write(out: Path, report: dict, matches: dict, classes: dict, overlap, drift: dict | None, sides) -> Path:
    """report.json, matches.safetensors (every feature) and index.html; return the page."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in matches.items()}
    tensors["status"] = classes["status"].contiguous()
    tensors["new"] = classes["new"].to(torch.uint8).contiguous()
    tensors["top_example_overlap"] = overlap.contiguous()
    if drift is not None:
        tensors["frequency_base"] = drift["base"]["frequency"].float().contiguous()
        tensors["frequency_other"] = drift["other"]["frequency"].float().contiguous()
    atomic_write(out / "matches.safetensors", save(tensors))
    atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    rows = {role: _index_rows(side) for role, side in sides.items()}
    page = comparison_page(report, lambda role, feature: _dashboard_link(out, sides[role], feature),
                           lambda role, feature: rows[role].get(feature))  # fmt: skip
    atomic_write(out / "index.html", page.encode())
    _link_from_dashboards(out / "index.html", sides)
    return out / "index.html"


def _link_from_dashboards(page: Path, sides: dict[str, _Side]) -> None:
    """List the comparison on each analyzed side's dashboard index."""
    for role, side in sides.items():
        if side.run is None:
            continue
        other = sides["other" if role == "base" else "base"].dictionary
        features = side.run.features(side.dictionary.hook, side.dictionary.name)
        title = f"compared with {other.name} ({other.directory})"
        if linked := link_report(features, f"compare/{page.parent}", title, page):
            side.run.upload(linked)


def _log_wandb(report: dict, cfg: CompareConfig, run: RunDir, wandb_cfg: WandbConfig | None) -> None:
    tracker = Tracker(wandb_cfg or WandbConfig(), run.root, "compare", {"compare": asdict(cfg)}, group=run.location)
    tracker.summary({k: v for k, v in report["summary"].items() if isinstance(v, int | float)})
    if tracker.active:
        import wandb

        table = wandb.Table(columns=list(ROW_COLUMNS))
        for row in report["most_changed"]:
            table.add_data(*[json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in ROW_COLUMNS])
        tracker.log({"most_changed": table})
    tracker.finish()


def _summary(base: Dictionary, other: Dictionary, matches: dict, classes: dict, cfg: CompareConfig) -> dict:
    """The report's head: both dictionaries, the thresholds and the matching's counts."""
    has = matches["assigned"] >= 0

    def side(d: Dictionary) -> dict:
        return {
            "sae": d.name,
            "dir": str(d.directory),
            "model_id": d.sae.meta.get("model_id"),
            "d_sae": d.sae.d_sae,
        }

    return {
        "hook": base.hook,
        "base": side(base),
        "other": side(other),
        "thresholds": {"kept": cfg.kept, "shifted": cfg.shifted},
        "summary": {
            **{name: int((classes["status"] == i).sum()) for i, name in enumerate(STATUS_NAMES)},
            "new": int(classes["new"].sum()),
            "mean_assigned_cos": float(matches["assigned_cos"][has].mean()),
            "mean_best_cos": float(matches["best_cos"].mean()),
            "mean_assigned_encoder_cos": float(matches["encoder_cos"][has].mean()),
        },
    }


def _drift_summary(summary: dict, matches: dict, drift: dict | None, d_sae: int) -> torch.Tensor:
    """Add the frequency change and top-example overlap of assigned pairs to `summary`; return the
    overlap of every base feature [d_sae] (NaN where not measured)."""
    has = matches["assigned"] >= 0
    overlap = torch.full((d_sae,), float("nan"))
    if drift is None:
        return overlap
    freq_b, freq_o = drift["base"]["frequency"], drift["other"]["frequency"]
    change = (freq_o[matches["assigned"][has]] + 1e-7).log10() - (freq_b[has] + 1e-7).log10()
    summary["median_abs_log10_frequency_change"] = float(change.abs().median())
    if drift["base"]["windows"] != drift["other"]["windows"]:
        summary["mean_top_example_overlap"] = None
        log.warning("the runs' activations cover different windows: top-example overlap is not computed")
        return overlap
    for f in has.nonzero()[:, 0].tolist():
        overlap[f] = _overlap(drift["base"]["top"][f], drift["other"]["top"][int(matches["assigned"][f])])
    summary["mean_top_example_overlap"] = float(overlap[has].nanmean())
    return overlap


def _check_comparable(base: Dictionary, other: Dictionary) -> None:
    if base.hook != other.hook:
        raise CompareError(
            f"the dictionaries sit at different hooks ({base.hook} and {other.hook}); compare one hook"
        )
    if base.writes != other.writes:
        raise CompareError(
            f"the dictionaries predict different activations ({base.writes} and {other.writes}); "
            "compare two SAEs or two transcoders of one MLP"
        )
    if base.sae.d_in != other.sae.d_in:
        raise CompareError(
            f"the dictionaries read different widths (d_in {base.sae.d_in} and {other.sae.d_in})"
        )


def _control(report: dict, classes: dict, base: Dictionary, cfg: CompareConfig) -> torch.Tensor | None:
    """Match compare.control against base: its counts go into report["control"], the comparison's
    counts against it into report["summary"]; return each base feature's assigned decoder cosine in the
    control [d_sae] (None without a control)."""
    if cfg.control is None:
        log.warning("no compare.control: the counts mix the models' difference with training randomness "
                    "(two seeds on one model disagree too); see the README's Compare section for a control")  # fmt: skip
        return None
    control = _side(cfg.control, cfg.sae, "control").dictionary
    _check_comparable(base, control)
    if control.sae.d_sae != base.sae.d_sae:
        raise CompareError(f"compare.control has {control.sae.d_sae} latents, base {base.sae.d_sae}: train the "
                           "control as the other dictionary was, at the base dictionary's width")  # fmt: skip
    matches = match_features(base.sae.cpu(), control.sae.cpu())
    control_classes = classify(matches, cfg.kept, cfg.shifted)
    report["control"] = _summary(base, control, matches, control_classes, cfg)["summary"]
    report["control"].update(sae=control.name, dir=str(control.directory))
    report["summary"].update(against_control(classes, control_classes))
    return matches["assigned_cos"]


def compare_dictionaries(
    cfg: CompareConfig,
    base_model: ModelConfig,
    other_model: ModelConfig,
    run_dir: str | Path,
    wandb_cfg: WandbConfig | None = None,
) -> dict:
    """Compare compare.base with compare.other; write <run_dir>/compare/ and return the report."""
    sides = {"base": _side(cfg.base, cfg.sae, "base"), "other": _side(cfg.other, cfg.sae, "other")}
    base, other = sides["base"].dictionary, sides["other"].dictionary
    _check_comparable(base, other)
    matches = match_features(base.sae.cpu(), other.sae.cpu())
    classes = classify(matches, cfg.kept, cfg.shifted)
    report = _summary(base, other, matches, classes, cfg)
    control_cos = _control(report, classes, base, cfg)
    if cfg.transfer:
        report["transfer"] = _transfer(sides, {"base": base_model, "other": other_model}, cfg)
    drift = _drift(sides, cfg, resolve_device("auto"))
    overlap = _drift_summary(report["summary"], matches, drift, base.sae.d_sae)
    report["most_changed"] = _most_changed(matches, classes, drift, overlap, cfg.top_changed, control_cos)
    run = RunDir.open(run_dir)
    with exclusive(run.comparison, f"the comparison {run.comparison}"):
        remove_stale_temporaries(run.comparison)
        page = _write(run.comparison, report, matches, classes, overlap, drift, sides)
        run.publish(run.comparison, "report.json")
    _log_wandb(report, cfg, run, wandb_cfg)
    s = report["summary"]
    log.info("kept %d, shifted %d, vanished %d, new %d (mean assigned decoder cos %.3f) -> %s",
             s["kept"], s["shifted"], s["vanished"], s["new"], s["mean_assigned_cos"], page)  # fmt: skip
    if "control" in report:
        c = report["control"]
        log.info("the control against base: kept %d, shifted %d, vanished %d (mean cos %.3f); kept against the "
                 "control but not against other: %d features, the reverse: %d (sign test z %.1f)", c["kept"], c["shifted"],
                 c["vanished"], c["mean_assigned_cos"], s["moved_beyond_control"], s["moved_only_in_control"],
                 s["sign_test_z"])  # fmt: skip
    return report


def run(cfg: DictConfig) -> dict:
    """The compare stage on a composed Hydra config."""
    return compare_dictionaries(
        to_dataclass(CompareConfig, cfg.compare),
        to_dataclass(ModelConfig, cfg.base_model),
        to_dataclass(ModelConfig, cfg.other_model),
        cfg.run_dir,
        to_dataclass(WandbConfig, cfg.wandb),
    )


main = stage_main("compare", run)
