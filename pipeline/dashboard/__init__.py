"""The static HTML dashboard of a dictionary's features: opens from the file system, no server, no
network. Data files are JSON wrapped in one JavaScript call each (browsers refuse to fetch local
files from a page, but load local scripts):

    data/features.js     SAE_DASHBOARD.index({"meta": ..., "features": [summary per feature]});
    data/chunk-NNN.js    SAE_DASHBOARD.chunk(NNN, [full record of features NNN*CHUNK ...]);
    data/vocab.js        SAE_DASHBOARD.vocab(["token text by id", ...]);
    data/reports.js      SAE_DASHBOARD.reports([{"key", "title", "href"}, ...]);  (link_report: the pages
                         later stages made of these features, e.g. a task's relevance ranking)
    data/explanations.js SAE_DASHBOARD.explanations({"<id>": {"explanation", "detection", "fuzzing"}});
                         (the explain stage)
features.json holds the same index as plain JSON and is written last: it marks the dashboard
complete. `load_features(directory)` reads the records. Token texts are only ever inserted as text
(textContent), never as markup. HTML made in Python (W&B tables, the comparison page): pages.py.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pipeline.fileio import atomic_write, remove_stale_temporaries

CHUNK = 256
INDEX_FILE = "features.json"
INDEX_PAGE = "index.html"  # the feature list
FEATURE_PAGE = "feature.html"  # one feature: FEATURE_PAGE#<id>
REPORTS_SCRIPT = "reports.js"  # under data/: link_report
EXPLANATIONS_SCRIPT = "explanations.js"  # under data/: write_explanations
STATIC = Path(__file__).with_name("static")
_WRAPPED = re.compile(r"^SAE_DASHBOARD\.\w+\((?:\d+, )?(.*)\);\s*$", re.S)


def _js(call: str, payload, index: int | None = None) -> bytes:
    args = f"{index}, " if index is not None else ""
    return f"SAE_DASHBOARD.{call}({args}{json.dumps(payload, ensure_ascii=True, separators=(',', ':'))});\n".encode()


def summary(record: dict, vocab: list[str]) -> dict:
    """The index row of a feature: numbers, the tokens it fires on, its promoted tokens, the text
    around its top example (before, the firing token, after)."""
    top = record["top"][0] if record["top"] else None
    snippet = ["", "", ""]
    if top:
        at = top["position"] - top["start"]
        snippet = ["".join(vocab[i] for i in top["ids"][max(0, at - 8) : at]), vocab[top["ids"][at]],
                   "".join(vocab[i] for i in top["ids"][at + 1 : at + 2])]  # fmt: skip
    return {
        "id": record["id"],
        "silent": record["silent"],
        "frequency": record["frequency"],
        "mean_activation": record["mean_activation"],
        "max_activation": record["max_activation"],
        "top_tokens": [vocab[i] for i, _ in record["logits"]["positive"][:5]],
        "fires_on": fires_on(record, vocab),
        "example": snippet,
        "detail": record["components"] is not None or bool(top and "loss" in top),
    }


def fires_on(record: dict, vocab: list[str], n: int = 3) -> list[str]:
    """The tokens most often at the feature's top examples' firing positions (ties: the higher example first)."""
    at = [e["ids"][e["position"] - e["start"]] for e in record["top"]]
    counts = Counter(at)
    return [vocab[i] for i in sorted(counts, key=lambda i: (-counts[i], at.index(i)))[:n]]


def write_dashboard(out: Path, meta: dict, chunks: Iterable[list[dict]], vocab: list[str]) -> Path:
    """Write the data scripts, the pages and, last, features.json into `out` (removed first, so that it
    never vouches for files being replaced); return index.html. `chunks` yields the records of
    features 0, 1, ... CHUNK at a time (the last may be shorter)."""
    (out / INDEX_FILE).unlink(missing_ok=True)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    summaries = []
    for n, records in enumerate(chunks):
        atomic_write(data / f"chunk-{n:03d}.js", _js("chunk", records, n))
        summaries.extend(summary(r, vocab) for r in records)
    index = {"meta": meta, "features": summaries}
    atomic_write(data / "vocab.js", _js("vocab", vocab))
    atomic_write(data / "features.js", _js("index", index))
    for page in STATIC.iterdir():
        atomic_write(out / page.name, page.read_bytes())
    atomic_write(out / INDEX_FILE, json.dumps(index).encode())
    return out / INDEX_PAGE


def load_vocab(directory: Path) -> list[str]:
    """The token texts by id a dashboard shows (data/vocab.js)."""
    return json.loads(_WRAPPED.match((Path(directory) / "data" / "vocab.js").read_text()).group(1))


def write_explanations(out: Path, explanations: dict[int, dict]) -> Path:
    """The explain stage's explanations and scores for the dashboard in `out` (data/explanations.js)."""
    path = out / "data" / EXPLANATIONS_SCRIPT
    atomic_write(path, _js("explanations", {str(k): v for k, v in explanations.items()}))
    return path


def link_report(out: Path, key: str, title: str, page: Path) -> Path | None:
    """List `page` (a later stage's page about these features) on the index of the dashboard in `out`,
    under `title`; a report of the same `key` is replaced. Returns the file written (None where the
    features are not analyzed)."""
    if not (out / INDEX_FILE).exists():
        return None
    path = out / "data" / REPORTS_SCRIPT
    reports = json.loads(_WRAPPED.match(path.read_text()).group(1)) if path.exists() else []
    reports = [r for r in reports if r["key"] != key]
    reports.append({"key": key, "title": title, "href": os.path.relpath(page, out)})
    atomic_write(path, _js("reports", sorted(reports, key=lambda r: r["key"])))
    return path


def remove_dashboard_temporaries(out: Path) -> None:
    """Delete what a killed writer of this dashboard left half-written (its writer holds the lock)."""
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / "data")


def index_rows(directory: Path) -> dict[int, dict]:
    """The index rows (`summary`) of an analyzed dictionary's features directory by feature id; {} where
    it is not analyzed."""
    index = directory / INDEX_FILE
    return {row["id"]: row for row in json.loads(index.read_text())["features"]} if index.exists() else {}


def load_features(directory: str | Path) -> tuple[dict, list[dict]]:
    """(meta, full records of every feature) of an analyzed dictionary's features directory."""
    directory = Path(directory)
    meta = json.loads((directory / INDEX_FILE).read_text())["meta"]
    records = []
    for path in sorted((directory / "data").glob("chunk-*.js")):
        records.extend(json.loads(_WRAPPED.match(path.read_text()).group(1)))
    return meta, records
