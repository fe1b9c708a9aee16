"""HTML made in Python: highlighted top examples (for W&B tables) and the comparison page of two
dictionaries. Every text that comes from data (token texts, names, paths) is escaped."""

from __future__ import annotations

from collections.abc import Callable
from html import escape

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1em 2em}table{border-collapse:collapse}"
    "td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}th{background:#f4f4f4}"
)


OUTLIER_FLAG = "⚠ outlier position (activation norm {:.1f}x the median): "


def highlighted_examples(record: dict, vocab: list[str], n: int = 3) -> str:
    """A feature record's first `n` top examples, each token shaded by the feature's activation."""
    peak = max(record["max_activation"], 1e-9)
    lines = []
    for example in record["top"][:n]:
        spans = []
        for token, act in zip(example["ids"], example["acts"], strict=True):
            alpha = min(1.0, max(0.0, act / peak))
            text = escape(vocab[token] if 0 <= token < len(vocab) else f"<{token}>")
            spans.append(f'<span style="background:rgba(255,120,0,{alpha:.2f})">{text}</span>')
        flag = OUTLIER_FLAG.format(example["norm_ratio"]) if example.get("outlier") else ""
        lines.append(f'<div style="font-family:monospace;white-space:pre-wrap">{flag}{"".join(spans)}</div>')
    return "".join(lines)


def _row(cells: list, header: bool = False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{cell}</{tag}>" for cell in cells) + "</tr>"


def _table(header: list[str], rows: list[list]) -> str:
    return "<table>" + _row(header, header=True) + "".join(_row(r) for r in rows) + "</table>"


def _transfer_table(transfer: dict) -> str:
    rows = [
        [
            escape(key),
            f"{r['l0']:.1f}",
            f"{r['fvu']:.4f}",
            f"{r['ce_loss_score']:.4f}",
            f"{r['kl_div_with_sae']:.4f}",
        ]
        for key, r in transfer.items()
    ]
    return "<h2>Transfer</h2>" + _table(["dictionary on model", "L0", "FVU", "CE recovered", "KL"], rows)


def meaning(summary: dict | None) -> str:
    """What a feature is, from its dashboard index row: the tokens it fires on and its top example's
    text around the firing token (marked); empty where the dictionary is not analyzed."""
    if not summary:
        return ""
    tokens = " ".join(escape(repr(t)) for t in summary.get("fires_on", []))
    before, token, after = summary.get("example") or ["", "", ""]
    snippet = f"{escape(before)}<mark>{escape(token)}</mark>{escape(after)}" if token else ""
    return f"{tokens}<br><span style='font-family:monospace;white-space:pre-wrap'>{snippet}</span>"


def _changed_table(rows: list[dict], link: Callable[[str, int], str | None],
                   describe: Callable[[str, int], dict | None], with_control: bool) -> str:  # fmt: skip
    """One line per changed base feature, its ids linked into the two runs' dashboards, and what each
    side's feature fires on (`with_control`: and its decoder cosine in the control)."""
    lines = []
    for row in rows:
        ids, meanings = [], []
        for role, feature in (("base", row["base"]), ("other", row["assigned"])):
            href = link(role, feature) if feature >= 0 else None
            text = f"#{feature}" if feature >= 0 else "-"
            ids.append(f"<a href='{escape(href)}'>{text}</a>" if href else text)
            meanings.append(meaning(describe(role, feature)) if feature >= 0 else "")
        freq = row["frequency"]
        overlap = row.get("overlap")
        control = [f"{row['control_cos']:.3f}"] if with_control else []
        lines.append([
            ids[0], meanings[0], escape(row["status"]), ids[1], meanings[1], f"{row['decoder_cos']:.3f}", *control,
            f"{row['encoder_cos']:.3f}", f"{freq[0]:.3%} &rarr; {freq[1]:.3%}" if freq else "",
            "" if overlap is None else f"{overlap:.2f}",
        ])  # fmt: skip
    header = ["base feature", "fires on (base)", "status", "assigned other", "fires on (other)", "decoder cos",
              *(["decoder cos in the control"] * with_control), "encoder cos", "frequency base &rarr; other",
              "top-example overlap"]  # fmt: skip
    title = "Moved furthest beyond the control" if with_control else "Most changed base features"
    return f"<h2>{title}</h2>" + _table(header, lines)


_NO_CONTROL = ("<p>No control: two dictionaries trained separately disagree even on one model, so these counts "
               "mix the models' difference with training randomness (compare.control measures the latter).</p>")


def _control_note(counts: dict) -> str:
    return (f"<p>Base features kept against the control but not against other: <b>{counts['moved_beyond_control']}</b>; "
            f"the reverse: {counts['moved_only_in_control']} (sign test z = {counts['sign_test_z']:.1f}; under 2: no "
            "movement beyond what the training alone causes, above 3: the other model moved features).</p>")


def comparison_page(report: dict, link: Callable[[str, int], str | None],
                    describe: Callable[[str, int], dict | None] = lambda _role, _feature: None) -> str:  # fmt: skip
    """The comparison report (compare stage) as a page; `link(role, feature)` is the href of a
    feature's dashboard page in the base or other run, or None where there is none; `describe` its
    dashboard index row (what it fires on), or None."""
    counts = report["summary"]
    summary = [["other", counts["kept"], counts["shifted"], counts["vanished"], counts["new"],
                f"{counts['mean_assigned_cos']:.3f}"]]  # fmt: skip
    if control := report.get("control"):
        summary.append([f"control ({escape(control['sae'])}: trained as other, on the base model)", control["kept"],
                        control["shifted"], control["vanished"], control["new"], f"{control['mean_assigned_cos']:.3f}"])  # fmt: skip
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Dictionary comparison</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(report['base']['sae'])} (base) vs {escape(report['other']['sae'])} (other)</h1>",
        f"<p>{escape(report['base']['model_id'] or '')} &rarr; {escape(report['other']['model_id'] or '')} "
        f"at {escape(report['hook'])}</p>",
        _table(["against base", "kept", "shifted", "vanished", "new", "mean assigned decoder cos"], summary),
        _control_note(counts) if control else _NO_CONTROL,
    ]
    if report.get("transfer"):
        parts.append(_transfer_table(report["transfer"]))
    parts.append(_changed_table(report["most_changed"], link, describe, "control" in report))
    parts.append("</body></html>")
    return "\n".join(parts)


def relevance_page(report: dict, link: str | None, fires_on: dict[int, list[str]]) -> str:
    """The relevance stage's ranking as a page: the features the task needs most and those it would
    do better without, each linked to its dashboard page (`link` + '#id', None: not analyzed) with
    the tokens it fires on where the dashboard has them."""

    def rows(features: list[dict]) -> list[list]:
        out = []
        for rank, f in enumerate(features, 1):
            name = f"#{f['id']}"
            cell = f"<a href='{escape(link)}#{f['id']}'>{name}</a>" if link else name
            tokens = " ".join(escape(repr(t)) for t in fires_on.get(f["id"], []))
            out.append([rank, cell, f"{f['effect_per_1k']:+.4f}", f"{f['frequency']:.3%}", tokens])
        return out

    header = ["rank", "feature", "loss change when removed (nats per 1k tokens)", "fires on (task)", "fires on (top examples)"]
    check = report["check"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Task relevance</title><style>{_STYLE}</style></head><body>",
        f"<h1>Features {escape(report['task'])} relies on: {escape(report['sae'])} at {escape(report['hook'])}</h1>",
        f"<p>{report['tokens']:,} task tokens, mean next-token loss {report['loss']:.4f}. Attribution patching: "
        "the first-order change of the task loss when the feature is removed at every position. Checked against "
        f"true removal for {len(check['features'])} features on {check['tokens']:,} tokens: Pearson r = {check['pearson']:.3f}.</p>",
        "<h2>Needed most (removing them raises the loss)</h2>", _table(header, rows(report["needed"])),
        "<h2>In the way (removing them lowers the loss)</h2>", _table(header, rows(report["in_the_way"])),
        "</body></html>",
    ]  # fmt: skip
    return "\n".join(parts)


def sparkline(values: list[float], width: int = 120, height: int = 28) -> str:
    """An inline SVG line through `values` (NaN points left out), scaled to their own range."""
    points = [(i, v) for i, v in enumerate(values) if v == v]
    if not points:
        return ""
    low, high = min(v for _, v in points), max(v for _, v in points)
    span, steps = (high - low) or 1.0, max(1, len(values) - 1)
    xy = " ".join(f"{2 + i * (width - 4) / steps:.1f},{height - 2 - (v - low) / span * (height - 4):.1f}" for i, v in points)
    return (f"<svg width='{width}' height='{height}' style='vertical-align:middle'><polyline points='{xy}' "
            "fill='none' stroke='#d35400' stroke-width='1.5'/></svg>")  # fmt: skip


def _steps_table(steps: list[dict]) -> str:
    keys = ("fvu", "ce_loss_score", "kl_div_with_sae", "l0", "mean_cosine")
    curves = ["<b>over the steps</b>", *[sparkline([s[k] for s in steps]) for k in keys], "", "", "", ""]
    rows = [[s["step"], *[f"{s[k]:.4f}" for k in keys[:3]], f"{s['l0']:.1f}", f"{s['mean_cosine']:.3f}", s["kept"],
             s["shifted"], s["vanished"], s["appeared"]] for s in steps]  # fmt: skip
    header = ["step", "FVU", "CE recovered", "KL", "L0", "mean cosine with θ₀", "kept", "shifted", "vanished", "appeared"]
    return _table(header, [*rows, curves])


def _trajectory_rows(rows: list[dict], link: str | None, describe: Callable[[int], dict | None]) -> list[list]:
    out = []
    for row in rows:
        name = f"#{row['id']}"
        freq, cos = row["frequency"], row["cosine"]
        out.append([
            f"<a href='{escape(link)}#{row['id']}'>{name}</a>" if link else name, meaning(describe(row["id"])),
            escape(row["status"]), row["first_step"], f"{sparkline(freq)} {freq[0]:.3%} &rarr; {freq[-1]:.3%}",
            f"{sparkline(cos)} {cos[-1]:.2f}", row["task_rank"] or "",
        ])  # fmt: skip
    return out


def track_page(report: dict, link: str | None, describe: Callable[[int], dict | None]) -> str:
    """The track stage's report as a page: the steps' metrics and curves, whether the task's features
    moved, and the most changed features with their trajectories, linked to the dashboard (`link` +
    '#id', None: not analyzed) with what each fires on (`describe`: its dashboard index row)."""
    rel, settings = report["relevance"], report["settings"]
    header = ["feature", "fires on (θ₀)", "status", "first changed at step", "frequency over the steps",
              "cosine with θ₀ over the steps", "task relevance rank"]  # fmt: skip
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Features through fine-tuning</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(report['sae'])} at {escape(report['hook'])} through {escape(report['checkpoints'])}</h1>",
        f"<p>The dictionary trained on θ₀ applied to every step's activations on the same {report['positions']:,} "
        f"held-out positions. A feature is kept while its activations keep a cosine of at least {settings['kept']} "
        f"with θ₀'s, vanished once it fires at under {settings['vanished']} times its θ₀ frequency; a feature "
        f"silent under θ₀ has appeared once it fires on {settings['appeared']} positions.</p>",
        _steps_table(report["steps"]),
        f"<h2>Did the task's features move?</h2><p>Of the {rel['top']} features {escape(report['task'])} relies on "
        f"most under θ₀ (attribution patching over {rel['task_tokens']:,} tokens), "
        f"{rel['moved_share_of_top_relevant']:.0%} moved by the last step, against {rel['moved_share_of_all']:.0%} "
        f"of all features firing under θ₀. Spearman correlation of |attribution| with movement (1 - cosine): "
        f"{rel['spearman_relevance_vs_movement']:.3f}.</p>",
        "<h2>Most changed features</h2>", _table(header, _trajectory_rows(report["most_changed"], link, describe)),
        "</body></html>",
    ]  # fmt: skip
    return "\n".join(parts)
