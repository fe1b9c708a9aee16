"""Fine-tune a causal LM briefly on a corpus and save it as a local model directory: the θ_f of a
base-versus-fine-tuned comparison (compare.py; `make compare-demo`).

    python -m pipeline finetune finetune.out=outputs/finetuned-model finetune.steps=30 finetune.save_every=10

Next-token loss on packed windows of the corpus, AdamW, bf16 autocast where the hardware has bf16
(a GPU, a CPU with native bf16; `resolve_dtype`). The result loads with `model=hub model.path=<out>`
in every stage; with `save_every`, the model of every N-th step is kept too, at
`<out>/checkpoints/step-<N>/`, for the track stage (features step by step).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.cli import stage_main
from pipeline.config import check_settings, to_dataclass
from pipeline.corpus import CorpusConfig, iter_texts, load_documents, pack_windows
from pipeline.fileio import atomic_write
from pipeline.finetune_checkpoints import CHECKPOINTS, DONE, step_dir
from pipeline.locks import exclusive
from pipeline.models import ModelConfig, load_model, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(name="stdlib_source", source="stdlib_source")
    )
    """The text it is fine-tuned on."""
    out: str = "outputs/finetuned-model"
    """Directory of the fine-tuned model (config, tokenizer, safetensors weights)."""
    steps: int = 30
    batch_size: int = 4
    context_length: int = 256
    lr: float = 1e-4
    seed: int = 0
    save_every: int | None = None
    """Keep the model of every N-th step too (<out>/checkpoints/step-<N>/); null: the final one only."""
    progress: bool = True

    def __post_init__(self) -> None:
        check_settings(self, "finetune", positive=("steps", "batch_size", "context_length", "lr", "save_every"))


def _save(model: torch.nn.Module, loaded, directory: Path, settings: str) -> None:
    """A loadable model directory, its done marker written last."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / DONE).unlink(missing_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    atomic_write(directory / DONE, settings.encode())


def _train(cfg: FinetuneConfig, loaded, save_step: Callable[[int, torch.nn.Module], None]) -> torch.nn.Module:
    """`cfg.steps` AdamW steps of next-token loss on packed windows of the corpus (bf16 autocast where native);
    `save_step(step, model)` after every save_every-th step but the last."""
    torch.manual_seed(cfg.seed)
    model = loaded.model.float().train().requires_grad_(True)
    texts = iter_texts(load_documents(cfg.corpus), cfg.corpus.text_field)
    windows = pack_windows(texts, loaded.tokenizer, cfg.context_length, "window")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    use_bf16 = resolve_dtype("auto", loaded.device) == torch.bfloat16  # where bf16 matmuls are native
    bar = tqdm(range(cfg.steps), desc="finetune", unit="step", disable=not cfg.progress)
    for step in bar:
        batch = torch.stack(list(itertools.islice(windows, cfg.batch_size))).to(loaded.device, torch.long)
        with torch.autocast(loaded.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_step(done, model)
    return model.eval().to(loaded.dtype)


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune and save; a directory already holding this configuration's result is kept. The
    done marker (finetune.json) is removed first and written last, after the model and tokenizer."""
    out = Path(cfg.out)
    settings = json.dumps(asdict(cfg), sort_keys=True, default=str)
    done = out / DONE
    if done.exists() and done.read_text() == settings:
        log.info("%s already holds this fine-tuned model", out)
        return out
    with exclusive(out, f"the fine-tuned model {out}"):
        done.unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # steps of an earlier fine-tuning
        loaded = load_model(cfg.model)

        def save_step(step: int, model: torch.nn.Module) -> None:  # in the model's dtype, as the final one
            _save(copy.deepcopy(model).eval().to(loaded.dtype), loaded, step_dir(out, step), settings)

        _save(_train(cfg, loaded, save_step), loaded, out, settings)
    log.info("fine-tuned %s for %d steps on %s -> %s", loaded.model_id, cfg.steps, cfg.corpus.name, out)
    return out


def run(cfg: DictConfig) -> Path:
    """The finetune stage on a composed Hydra config."""
    return finetune(to_dataclass(FinetuneConfig, cfg.finetune))


main = stage_main("finetune", run)
