"""Compare stage: how two dictionaries at the same hook differ — the main case being one trained on a
base model θ₀ and one on a fine-tuned θ_f.

    python -m pipeline compare base=outputs/demo other=outputs/demo-finetuned \
        model@other_model=hub other_model.path=outputs/demo-finetuned/model

  matching     decoder cosine similarity between every pair of features; the optimal one-to-one
               assignment (Hungarian) and each feature's best match. A base feature is kept
               (assigned cos >= compare.kept), shifted (>= compare.shifted) or vanished; an other
               feature without a partner above compare.shifted is new. Encoder cosines of the pairs too.
  transfer     each dictionary evaluated on both models (FVU, L0, CE loss recovered, KL): does the
               old explanation still hold after fine-tuning?
  drift        for assigned pairs: firing frequency on each run's activations and the overlap of
               their top-activating examples (same corpus windows).
Writes `<run_dir>/compare/report.json`, `matches.safetensors` (per feature), `index.html` (the most
changed features, linked into both runs' dashboards), and logs to W&B.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from safetensors.torch import save
from scipy.optimize import linear_sum_assignment

from pipeline.analyze import AnalyzeConfig, stream_features
from pipeline.config import CONF_DIR, to_dataclass
from pipeline.dictionaries import Dictionary, DictionaryError, find_dictionaries, is_dictionary
from pipeline.evaluate import EvaluateConfig, evaluate_group, summary_row
from pipeline.fileio import atomic_write
from pipeline.models import ModelConfig, load_model, resolve_device
from pipeline.shards import ShardSet
from pipeline.tracking import Tracker, WandbConfig

log = logging.getLogger(__name__)

DENSE_ASSIGNMENT_LIMIT = 1 << 28  # cosine matrices up to ~16k x 16k get the optimal assignment


class CompareError(DictionaryError):
    """The comparison cannot run as configured; the message says how to fix it."""


@dataclass
class CompareConfig:
    base: str = ""
    """Run directory (or SAE directory inside one) of the base model θ₀."""
    other: str = ""
    """Run directory (or SAE directory inside one) of the other model, e.g. the fine-tuned θ_f."""
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
        if not 0 <= self.shifted <= self.kept <= 1:
            raise CompareError(
                f"need 0 <= compare.shifted ({self.shifted}) <= compare.kept ({self.kept}) <= 1"
            )


@dataclass
class _Side:
    run_dir: Path | None
    dictionary: Dictionary


def _side(path: str, sae: str | None, role: str) -> _Side:
    p = Path(path)
    if is_dictionary(p):
        run_dir = p.parents[2] if p.parent.parent.name == "sae" else None
        return _Side(run_dir, find_dictionaries(p.parent, [str(p)], None, False, "compare")[0])
    found = find_dictionaries(p, [sae] if sae else [], None, False, "compare")
    if len(found) != 1:
        names = [f"{d.hook}/{d.name}" for d in found]
        raise CompareError(
            f"compare.{role}={path} holds {len(found)} dictionaries {names}; pick one with compare.sae=<name>"
        )
    return _Side(p, found[0])


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(weight.detach().float(), dim=-1)


def match_features(base, other) -> dict[str, torch.Tensor]:
    """Decoder-cosine matching of two dictionaries: the optimal one-to-one assignment (`assigned`,
    -1 where none; `assigned_cos`), best matches both ways, and encoder cosines of assigned pairs."""
    dec_b, dec_o = _unit_rows(base.W_dec), _unit_rows(other.W_dec)
    cos = dec_b @ dec_o.T  # [d_sae base, d_sae other]
    best_cos, best = cos.max(1)
    best_cos_other, _ = cos.max(0)
    assigned = torch.full((len(dec_b),), -1, dtype=torch.long)
    if cos.numel() <= DENSE_ASSIGNMENT_LIMIT:
        rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
        assigned[torch.from_numpy(rows)] = torch.from_numpy(cols)
    else:  # greedy one-to-one by decreasing cosine: near-optimal when most features have one clear partner
        log.warning("%d x %d cosine matrix: greedy assignment instead of the optimal one", *cos.shape)
        taken = torch.zeros(len(dec_o), dtype=torch.bool)
        for i in torch.argsort(best_cos, descending=True).tolist():
            row = cos[i].masked_fill(taken, -2)
            j = int(row.argmax())
            assigned[i], taken[j] = j, True
    has = assigned >= 0
    assigned_cos = torch.full((len(dec_b),), float("nan"))
    assigned_cos[has] = cos[has.nonzero()[:, 0], assigned[has]]
    enc_b, enc_o = _unit_rows(base.W_enc.T), _unit_rows(other.W_enc.T)
    encoder_cos = torch.full((len(dec_b),), float("nan"))
    encoder_cos[has] = (enc_b[has] * enc_o[assigned[has]]).sum(-1)
    partner_of_other = torch.full((len(dec_o),), -1, dtype=torch.long)
    partner_of_other[assigned[has]] = has.nonzero()[:, 0]
    other_cos = torch.full((len(dec_o),), float("nan"))
    other_cos[assigned[has]] = assigned_cos[has]
    return {
        "assigned": assigned,
        "assigned_cos": assigned_cos,
        "best": best,
        "best_cos": best_cos,
        "best_cos_other": best_cos_other,
        "encoder_cos": encoder_cos,
        "partner_of_other": partner_of_other,
        "other_assigned_cos": other_cos,
    }


def classify(matches: dict[str, torch.Tensor], kept: float, shifted: float) -> dict[str, torch.Tensor]:
    """Per base feature: 0 kept, 1 shifted, 2 vanished; per other feature: True if new."""
    cos = matches["assigned_cos"].nan_to_num(-1.0)
    status = torch.where(cos >= kept, 0, torch.where(cos >= shifted, 1, 2))
    new = matches["other_assigned_cos"].nan_to_num(-1.0) < shifted
    return {"status": status, "new": new}


def _drift(sides: dict[str, _Side], cfg: CompareConfig, device) -> dict[str, dict] | None:
    """Frequency and top examples of every feature on its own run's activations."""
    out = {}
    for role, side in sides.items():
        if side.run_dir is None:
            return None
        shards = ShardSet(side.run_dir / "activations" / side.dictionary.hook)
        ctx = shards.manifest.context_length
        n = (
            shards.manifest.n_sequences
            if cfg.tokens is None
            else min(shards.manifest.n_sequences, -(-cfg.tokens // ctx))
        )
        passed = stream_features(
            side.dictionary.sae.to(device), shards, n, AnalyzeConfig(top_k=cfg.top_k, samples=1, progress=cfg.progress), device
        )  # fmt: skip
        out[role] = {
            "frequency": (passed.stats.count.double() / max(passed.stats.tokens, 1)).cpu(),
            "top": passed.top.token.cpu(),
            # top examples are comparable only where both runs hold the very same token windows
            "windows": hashlib.sha256(shards.tokens_at(torch.arange(n * ctx)).numpy().tobytes()).hexdigest(),
        }
    return out


def _overlap(top_b: torch.Tensor, top_o: torch.Tensor) -> float:
    a, b = set(top_b[top_b >= 0].tolist()), set(top_o[top_o >= 0].tolist())
    return len(a & b) / max(1, min(len(a), len(b))) if a and b else float("nan")


def _transfer(sides: dict[str, _Side], models: dict[str, ModelConfig], cfg: CompareConfig) -> dict:
    """Both dictionaries on both runs (each run's own model and held-out windows)."""
    eval_cfg = EvaluateConfig(tokens=cfg.eval_tokens, force=True, progress=cfg.progress)
    results = {}
    for run_role, side in sides.items():
        if side.run_dir is None:
            continue
        loaded = load_model(models[run_role])
        group = [
            Dictionary(
                f"{dict_role}-dictionary", s.dictionary.directory, s.dictionary.sae, side.dictionary.hook
            )
            for dict_role, s in sides.items()
        ]
        reports, _ = evaluate_group(loaded, side.run_dir, side.dictionary.hook, group, eval_cfg, reuse=False)
        for dict_role in sides:
            row = summary_row(reports[f"{dict_role}-dictionary"])
            results[f"{dict_role}_dictionary_on_{run_role}_model"] = {
                k: row[k]
                for k in (
                    "l0",
                    "fvu",
                    "ce_loss_score",
                    "kl_div_with_sae",
                    "ce_loss_with_sae",
                    "ce_loss_without_sae",
                )
            }
        del loaded
    return results


def _dashboard_link(out: Path, side: _Side, feature: int) -> str | None:
    if side.run_dir is None:
        return None
    page = side.run_dir / "features" / side.dictionary.hook / side.dictionary.name / "feature.html"
    return f"{os.path.relpath(page, out)}#{feature}" if page.exists() else None


def _html(report: dict, rows: list[dict], out: Path, sides: dict[str, _Side]) -> str:
    e = html.escape
    counts = report["summary"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Dictionary comparison</title><style>",
        "body{font-family:system-ui,sans-serif;margin:1em 2em}table{border-collapse:collapse}"
        "td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}th{background:#f4f4f4}</style></head><body>",
        f"<h1>{e(report['base']['sae'])} (base) vs {e(report['other']['sae'])} (other)</h1>",
        f"<p>{e(report['base']['model_id'] or '')} &rarr; {e(report['other']['model_id'] or '')} at {e(report['hook'])}</p>",
        "<table><tr><th>kept</th><th>shifted</th><th>vanished</th><th>new</th><th>mean assigned decoder cos</th></tr>",
        f"<tr><td>{counts['kept']}</td><td>{counts['shifted']}</td><td>{counts['vanished']}</td><td>{counts['new']}</td>"
        f"<td>{counts['mean_assigned_cos']:.3f}</td></tr></table>",
    ]
    if report.get("transfer"):
        parts.append(
            "<h2>Transfer</h2><table><tr><th>dictionary on model</th><th>L0</th><th>FVU</th><th>CE recovered</th><th>KL</th></tr>"
        )
        for key, row in report["transfer"].items():
            parts.append(f"<tr><td>{e(key)}</td><td>{row['l0']:.1f}</td><td>{row['fvu']:.4f}</td>"
                         f"<td>{row['ce_loss_score']:.4f}</td><td>{row['kl_div_with_sae']:.4f}</td></tr>")  # fmt: skip
        parts.append("</table>")
    parts.append("<h2>Most changed base features</h2><table><tr><th>base feature</th><th>status</th><th>assigned other"
                 "</th><th>decoder cos</th><th>encoder cos</th><th>frequency base &rarr; other</th><th>top-example overlap</th></tr>")  # fmt: skip
    for row in rows:
        links = []
        for role, feature in (("base", row["base"]), ("other", row["assigned"])):
            href = _dashboard_link(out, sides[role], feature) if feature >= 0 else None
            text = f"#{feature}" if feature >= 0 else "-"
            links.append(f"<a href='{e(href)}'>{text}</a>" if href else text)
        freq = row["frequency"]
        freq_text = f"{freq[0]:.2e} &rarr; {freq[1]:.2e}" if freq else ""
        overlap = row.get("overlap")
        parts.append(f"<tr><td>{links[0]}</td><td>{e(row['status'])}</td><td>{links[1]}</td><td>{row['decoder_cos']:.3f}</td>"
                     f"<td>{row['encoder_cos']:.3f}</td><td>{freq_text}</td><td>{'' if overlap is None else f'{overlap:.2f}'}</td></tr>")  # fmt: skip
    parts.append("</table></body></html>")
    return "\n".join(parts)


STATUS_NAMES = ("kept", "shifted", "vanished")
ROW_COLUMNS = ("base", "assigned", "status", "decoder_cos", "encoder_cos", "best_other", "best_cos",
               "frequency", "overlap")  # fmt: skip


def _most_changed(
    matches: dict, classes: dict, drift: dict | None, overlap: torch.Tensor, n: int
) -> list[dict]:
    """The n base features with the lowest assigned decoder cosine, one row each (ROW_COLUMNS)."""
    rows = []
    for f in torch.argsort(matches["assigned_cos"].nan_to_num(-1.0))[:n].tolist():
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
            }
        )
    return rows


def _write(out: Path, report: dict, matches: dict, classes: dict, overlap, drift: dict | None, sides) -> None:
    """report.json, matches.safetensors (every feature) and index.html."""
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
    atomic_write(out / "index.html", _html(report, report["most_changed"], out, sides).encode())


def _log_wandb(report: dict, cfg: CompareConfig, run_dir, wandb_cfg: WandbConfig | None) -> None:
    tracker = Tracker(wandb_cfg or WandbConfig(), run_dir, "compare", {"compare": asdict(cfg)})
    tracker.summary({k: v for k, v in report["summary"].items() if isinstance(v, int | float)})
    if tracker.active:
        import wandb

        table = wandb.Table(columns=list(ROW_COLUMNS))
        for row in report["most_changed"]:
            table.add_data(*[json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in ROW_COLUMNS])
        tracker.log({"most_changed": table})
    tracker.finish()


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
    if base.hook != other.hook:
        raise CompareError(
            f"the dictionaries sit at different hooks ({base.hook} and {other.hook}); compare one hook"
        )
    if base.sae.d_in != other.sae.d_in:
        raise CompareError(
            f"the dictionaries read different widths (d_in {base.sae.d_in} and {other.sae.d_in})"
        )
    matches = match_features(base.sae.cpu(), other.sae.cpu())
    classes = classify(matches, cfg.kept, cfg.shifted)
    has = matches["assigned"] >= 0
    report = {
        "hook": base.hook,
        "base": {"sae": base.name, "dir": str(base.directory), "model_id": base.sae.meta.get("model_id"), "d_sae": base.sae.d_sae},
        "other": {"sae": other.name, "dir": str(other.directory), "model_id": other.sae.meta.get("model_id"), "d_sae": other.sae.d_sae},
        "thresholds": {"kept": cfg.kept, "shifted": cfg.shifted},
        "summary": {
            **{name: int((classes["status"] == i).sum()) for i, name in enumerate(STATUS_NAMES)},
            "new": int(classes["new"].sum()),
            "mean_assigned_cos": float(matches["assigned_cos"][has].mean()),
            "mean_best_cos": float(matches["best_cos"].mean()),
            "mean_assigned_encoder_cos": float(matches["encoder_cos"][has].mean()),
        },
    }  # fmt: skip
    models = {"base": base_model, "other": other_model}
    if cfg.transfer:
        report["transfer"] = _transfer(sides, models, cfg)
    drift = _drift(sides, cfg, resolve_device("auto"))
    same_windows = drift is not None and drift["base"]["windows"] == drift["other"]["windows"]
    if drift is not None:
        freq_b, freq_o = drift["base"]["frequency"], drift["other"]["frequency"]
        change = torch.full_like(freq_b, float("nan"))
        change[has] = (freq_o[matches["assigned"][has]] + 1e-7).log10() - (freq_b[has] + 1e-7).log10()
        report["summary"]["median_abs_log10_frequency_change"] = float(change[has].abs().median())
    overlap = torch.full((base.sae.d_sae,), float("nan"))
    if same_windows:
        for f in has.nonzero()[:, 0].tolist():
            overlap[f] = _overlap(drift["base"]["top"][f], drift["other"]["top"][int(matches["assigned"][f])])
        report["summary"]["mean_top_example_overlap"] = float(overlap[has].nanmean())
    elif drift is not None:
        report["summary"]["mean_top_example_overlap"] = None
        log.warning("the runs' activations cover different windows: top-example overlap is not computed")

    report["most_changed"] = _most_changed(matches, classes, drift, overlap, cfg.top_changed)
    out = Path(run_dir) / "compare"
    _write(out, report, matches, classes, overlap, drift, sides)
    _log_wandb(report, cfg, run_dir, wandb_cfg)
    s = report["summary"]
    log.info("kept %d, shifted %d, vanished %d, new %d (mean assigned decoder cos %.3f) -> %s",
             s["kept"], s["shifted"], s["vanished"], s["new"], s["mean_assigned_cos"], out / "index.html")  # fmt: skip
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    run(cfg)
