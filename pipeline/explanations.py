"""Explanations of features written and scored by a language model (the explain stage's logic).

A feature's explanation is one sentence an explainer model writes from its top examples, the tokens
it fires on marked <<like this>>. It is scored the way the field scores such explanations (Bills et
al. 2023; delphi, Paulo et al. 2024) with a judge model that sees the explanation and one text at a
time and answers Yes or No:
  detection   does the feature fire somewhere in this text? over activating texts (the feature's
              examples across its activation range, none shown to the explainer) and as many texts
              where it never fires;
  fuzzing     are the marked tokens ones it fires on? over activating texts marked where it fires
              and the same texts marked on as many other tokens.
Each score is the judge's balanced accuracy (P(Yes) > 0.5) and its AUROC (threshold-free: a judge
that says Yes to everything can still rank well). Two reference explanations get the same scores: the
tokens the feature fires on most (a list, no model) and another feature's explanation (random).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PROMPT_VERSION = 2  # the prompts and how the scored texts are chosen: a change re-explains every feature
MARK_SHARE = 0.4  # tokens at >= this share of a text's peak activation are the ones marked


@dataclass
class Text:
    """A context shown to the explainer or the judge."""

    tokens: list[str]
    acts: list[float]
    """The feature's activation at each token (all 0 where it never fires)."""

    def plain(self) -> str:
        return "".join(self.tokens)

    def firing(self) -> list[int]:
        peak = max(self.acts, default=0.0)
        return [i for i, a in enumerate(self.acts) if peak > 0 and a >= MARK_SHARE * peak]

    def marked(self, where: list[int] | None = None) -> str:
        """The text with the tokens at `where` (default: where the feature fires) marked <<like this>>."""
        marks = set(self.firing() if where is None else where)
        return "".join(f"<<{t}>>" if i in marks else t for i, t in enumerate(self.tokens))


def record_texts(examples: list[dict], vocab: list[str]) -> list[Text]:
    """Texts from a dashboard record's examples (`ids`, `acts`)."""
    return [Text([vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in e["ids"]], list(e["acts"])) for e in examples]


def explanation_messages(texts: list[Text]) -> list[dict]:
    shown = "\n".join(f"{n}. {t.marked()}" for n, t in enumerate(texts, 1))
    return [{"role": "user", "content":
             "A feature of a language model fires on some tokens of these texts, marked <<like this>>:\n"
             f"{shown}\nIn one short sentence, say what the feature detects. Answer with that sentence only."}]  # fmt: skip


def detection_messages(explanation: str, text: Text) -> list[dict]:
    return [{"role": "user", "content": f'A feature of a language model fires on: "{explanation}"\n'
             f'Text: """{text.plain()}"""\nDoes the feature fire somewhere in this text? Answer Yes or No.'}]  # fmt: skip


def fuzzing_messages(explanation: str, marked: str) -> list[dict]:
    return [{"role": "user", "content": f'A feature of a language model fires on: "{explanation}"\n'
             f'In this text some tokens are marked <<like this>>:\n"""{marked}"""\n'
             "Are the marked tokens ones the feature fires on? Answer Yes or No."}]  # fmt: skip


def token_list(fires_on: list[str]) -> str:
    """The baseline explanation: the tokens the feature fires on most."""
    return "the tokens " + ", ".join(repr(t) for t in fires_on)


def fuzzing_items(texts: list[Text], rng: random.Random) -> list[tuple[str, int]]:
    """Each activating text marked where the feature fires (label 1) and on as many other tokens (0)."""
    items = []
    for t in texts:
        firing = t.firing()
        others = [i for i in range(len(t.tokens)) if i not in firing]
        if not firing or len(others) < len(firing):
            continue
        items += [(t.marked(), 1), (t.marked(rng.sample(others, len(firing))), 0)]
    return items


def auroc(scores: list[float], labels: list[int]) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    p, n = torch.tensor(pos)[:, None], torch.tensor(neg)[None, :]
    return float((p > n).float().mean() + 0.5 * (p == n).float().mean())


def judged(scores: list[float], labels: list[int]) -> dict:
    """Balanced accuracy at P(Yes) > 0.5 and AUROC of a judge's P(Yes) over labelled items (both NaN
    where there are none: a feature with nothing to judge is left out of the means, not counted as 0)."""
    recalls = []
    for label in (1, 0):
        said = [score > 0.5 for score, y in zip(scores, labels, strict=True) if y == label]
        if said:
            recalls.append(sum(s == bool(label) for s in said) / len(said))
    balanced = sum(recalls) / len(recalls) if recalls else float("nan")
    return {"accuracy": balanced, "auroc": auroc(scores, labels), "items": len(labels)}
