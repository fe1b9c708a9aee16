"""Matryoshka BatchTopK against plain BatchTopK of the same size, on the default model's shards.

    python bench/bench_matryoshka.py                 # after `python -m pipeline harvest` (outputs/default)
    python bench/bench_matryoshka.py --run-dir outputs/demo --expansion 8

Trains both with the train stage's defaults on the same batches (`train.variants`; those already in
the run directory are used), then prints for each:
  - held-out FVU of every nested prefix (d_sae / 16 ... d_sae: the Matryoshka levels). Plain
    BatchTopK's latents have no order, so its prefixes are the baseline a random order gives;
  - L0, dead and silent fractions, and the mean firing frequency of each prefix group (general,
    frequent latents should come first);
  - first-letter feature absorption (Chanin et al. 2024, "A is for Absorption"; simplified from
    SAEBench): for each letter whose linear probe on the activations ("the token starts with L",
    class-balanced logistic regression on the first half of the tokens) reaches F1 >= 0.8 on the
    second half, the main latent is the one whose firing best predicts the label (F1, first half).
    On second-half tokens that start with L and that the probe recognises: `recall` is the share on
    which the main latent fires; `absorbed` the share on which it does not while a rarer (more
    specific) firing latent carries >= 40 % of the reconstruction's projection on the probe direction,
    with decoder cosine >= 0.025 to it: the letter went into a more specific latent ("short" took
    "starts with s"). Averaged over the letters.
"""

from __future__ import annotations

import argparse
import platform
import string
from pathlib import Path

import torch
from default_model import default_model

from pipeline.models import load_model
from pipeline.sae import Sae, SaeConfig
from pipeline.sae.matryoshka import nested_widths
from pipeline.shards import ShardSet
from pipeline.stages import train as train_stage
from pipeline.stages.analyze import vocabulary
from pipeline.tracking import WandbConfig
from pipeline.training import TrainConfig

HOOK = "blocks.9.resid_post"
LETTERS = string.ascii_lowercase
MIN_POSITIVES, MIN_PROBE_F1 = 300, 0.8
ABSORBING_SHARE, ABSORBING_COSINE = 0.4, 0.025


def train_both(run_dir: Path, expansion: int, k: int) -> dict[str, Sae]:
    """Both dictionaries, trained unless the run directory holds them trained with these settings
    (the train stage's own check: e.g. from `python -m pipeline train
    'train.variants=[{architecture: batchtopk}, {architecture: matryoshka_batchtopk}]'`)."""
    variants = [{"architecture": "batchtopk"}, {"architecture": "matryoshka_batchtopk"}]
    found = train_stage.train_saes(TrainConfig(hook=HOOK, variants=variants, progress=False),
                                   SaeConfig(expansion=expansion, k=k), run_dir, WandbConfig(mode="disabled"))  # fmt: skip
    return {name: Sae.load(path) for name, path in found.items()}


def first_letters(tokens: torch.Tensor, vocab: list[str]) -> torch.Tensor:
    """Each token's first letter as 0-25 (leading spaces skipped), -1 where it starts with none."""
    def letter(text: str) -> int:
        text = text.strip()
        return LETTERS.index(text[0].lower()) if text and text[0].lower() in LETTERS else -1

    return torch.tensor([letter(v) for v in vocab])[tokens]


def f1(tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    return 2 * tp / (predicted + actual).clamp_min(1)


def letter_probes(x: torch.Tensor, labels: torch.Tensor, half: int) -> dict[int, torch.Tensor]:
    """Unit probe directions [d_in] of the letters whose class-balanced logistic probe, fit on the first
    half, reaches F1 >= MIN_PROBE_F1 on the second; x is scaled to unit mean norm."""
    probes = {}
    for letter in range(len(LETTERS)):
        y = (labels == letter).float()
        if y[:half].sum() < MIN_POSITIVES or y[half:].sum() < MIN_POSITIVES:
            continue
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=100)
        balance = (1 - y[:half].mean()) / y[:half].mean()

        def closure(y=y, w=w, b=b, opt=opt, balance=balance):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:half] @ w + b, y[:half], pos_weight=balance)
            (loss + 1e-4 * w.pow(2).sum()).backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            said, true = x[half:] @ w + b > 0, y[half:] > 0
            score = f1((said & true).sum(), said.sum(), true.sum())
        if score >= MIN_PROBE_F1:
            probes[letter] = (w.detach() / w.detach().norm(), b.detach(), w.detach())
    return probes


@torch.no_grad()
def absorption(sae: Sae, x: torch.Tensor, scaled: torch.Tensor, labels: torch.Tensor, half: int, probes: dict) -> dict:
    """Main-latent recall and absorbed share on the probe-recognised tokens of each letter, averaged."""
    letters = list(probes)
    onehot = torch.stack([labels == letter for letter in letters], 1).float()  # [n, letters]
    fired_with = torch.zeros(sae.d_sae, len(letters))
    fired = torch.zeros(sae.d_sae)
    for lo in range(0, half, 8192):
        active = (sae.encode(x[lo : min(lo + 8192, half)]) > 0).float()
        fired_with += active.T @ onehot[lo : lo + len(active)]
        fired += active.sum(0)
    main = f1(fired_with, fired[:, None], onehot[:half].sum(0)[None]).argmax(0)  # [letters]
    directions = torch.stack([probes[letter][0] for letter in letters], 1)  # [d_in, letters]
    cosine = torch.nn.functional.normalize(sae.W_dec, dim=1) @ directions  # [d_sae, letters]
    projection = sae.W_dec @ directions  # [d_sae, letters]: a unit activation's push along each probe
    recalls, absorbed = [], []
    for i, letter in enumerate(letters):
        w, b = probes[letter][2], probes[letter][1]
        rows = half + torch.nonzero((labels[half:] == letter) & (scaled[half:] @ w + b > 0)).flatten()
        codes = sae.encode(x[rows])  # [tokens, d_sae]
        hit = codes[:, main[i]] > 0
        parts = codes * projection[:, i]  # [tokens, d_sae]: each latent's share of the probe projection
        # absorbing candidates: aligned with the probe and more specific (rarer) than the main latent
        parts[:, (cosine[:, i] < ABSORBING_COSINE) | (fired >= fired[main[i]])] = 0
        total = (codes * projection[:, i]).sum(1)
        taken = (parts.max(1).values >= ABSORBING_SHARE * total) & (total > 0)
        recalls.append(float(hit.float().mean()))
        absorbed.append(float((~hit & taken).float().mean()))
    return {"letters": len(letters), "recall": sum(recalls) / len(letters), "absorbed": sum(absorbed) / len(letters)}


@torch.no_grad()
def prefix_report(sae: Sae, heldout: torch.Tensor, sample: torch.Tensor) -> dict:
    """Held-out FVU of each Matryoshka-level prefix and the mean firing frequency of each group."""
    widths = nested_widths(None, sae.d_sae)  # the default Matryoshka levels, for both dictionaries
    codes = sae.encode(heldout)
    variance = (heldout - heldout.mean(0)).pow(2).sum()
    fvu = {w: float((heldout - sae.decode(codes[:, :w], stop=w)).pow(2).sum() / variance) for w in widths}
    frequency = torch.cat([(sae.encode(sample[lo : lo + 8192]) > 0).float().mean(0, keepdim=True)
                           for lo in range(0, len(sample), 8192)]).mean(0)  # fmt: skip
    groups = {w: float(frequency[start:w].mean()) for start, w in zip([0, *widths], widths, strict=False)}
    return {"prefix_fvu": fvu, "group_frequency": groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("outputs/default"))
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=131_072, help="tokens of the shards the probes use")
    args = parser.parse_args()
    saes = train_both(args.run_dir, args.expansion, args.k)
    shards = ShardSet(args.run_dir / "activations" / HOOK)
    idx = torch.arange(min(args.tokens, shards.n_tokens))
    vocab = vocabulary(load_model(default_model()).tokenizer)
    labels = first_letters(shards.tokens_at(idx), vocab)
    keep = torch.nonzero(labels >= 0).flatten()
    x, labels = shards.gather(idx[keep]).float(), labels[keep]
    scaled = x / x.norm(dim=1).mean()
    half = len(x) // 2
    probes = letter_probes(scaled, labels, half)
    held = torch.arange(next(iter(saes.values())).meta["training_split_tokens"], shards.n_tokens)  # the train stage's held-out split
    heldout = shards.gather(held[shards.tokens_at(held) != shards.manifest.bos_token_id]).float()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; {HOOK}, "
          f"{args.expansion}x k {args.k}; probes for {len(probes)} letters on {len(x)} tokens")  # fmt: skip
    for name, sae in saes.items():
        metrics = sae.meta["metrics"]
        report = prefix_report(sae, heldout, x[:half])
        letters = absorption(sae, x, scaled, labels, half, probes)
        print(f"\n## {name}: held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead "
              f"{100 * metrics['dead_fraction']:.2f} %, silent {100 * metrics['silent_fraction']:.2f} %")  # fmt: skip
        print("prefix | held-out FVU | mean frequency of its new latents")
        for w, value in report["prefix_fvu"].items():
            print(f"{w:6d} | {value:.4f} | {100 * report['group_frequency'][w]:.3f} %")
        print(f"first letters ({letters['letters']}): main-latent recall {100 * letters['recall']:.1f} %, "
              f"absorbed {100 * letters['absorbed']:.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
