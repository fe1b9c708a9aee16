"""Documents -> fixed windows of token ids (streaming, packing, BOS policy).

Sources:
  pydoc          the documentation every CPython ships: `pydoc_data.topics` and the docstrings of the
                 standard library (read with `ast`, nothing imported), ~2.2M characters
  stdlib_source  the standard library's source code itself (~12M characters)
  hub            any hub dataset, streamed (`datasets.load_dataset(..., streaming=True)`)
  files          local text / jsonl / parquet files through `datasets`

Packing concatenates documents into one token stream and cuts it into windows of
`context_length` tokens. BOS policies:
  window    every window starts with BOS followed by context_length - 1 stream tokens; documents
            are separated by EOS
  document  every document is prefixed with BOS; windows are plain cuts of the stream
  none      no BOS; documents separated by EOS
The tail shorter than a window is dropped. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import ast
import glob
import itertools
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import check_settings
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

BOS_POLICIES = ("window", "document", "none")
_FILE_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
# Tests, vendored packages and IDLE's resources are not documentation of the language.
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


class CorpusError(PipelineError, ValueError):
    """The corpus is missing, empty or too short; the message says which and what to do."""


@dataclass
class CorpusConfig:
    """Which documents to read."""

    name: str = "pydoc"
    """Short name, recorded in manifests."""
    source: str = "pydoc"
    """pydoc | stdlib_source | hub | files."""
    path: str | None = None
    """Hub dataset id (source=hub) or a file / glob / directory (source=files)."""
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    text_field: str = "text"
    """Column holding the document text (hub, jsonl, parquet)."""
    shuffle_seed: int | None = 0
    """Shuffle documents with this seed (null keeps the source order)."""
    shuffle_buffer: int = 10_000
    """Buffer size for shuffling a streamed hub dataset."""

    def __post_init__(self) -> None:
        check_settings(
            self, "corpus", CorpusError, positive=("shuffle_buffer",),
            choices={"source": ("pydoc", "stdlib_source", "hub", "files")},
        )  # fmt: skip


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _module_docstrings(path: Path, module: str) -> str | None:
    """One document per module: its docstring and those of its classes and functions, with headings."""
    source = _read_source(path)
    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                parts.append(f"{title}\n\n{doc}")
    return "\n\n".join(parts) or None


def _module_name(path: Path) -> str:
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def pydoc_documents() -> list[str]:
    """Python's bundled documentation: the pydoc topics and the standard library's docstrings."""
    import pydoc_data.topics

    docs = [f"{title}\n\n{text}" for title, text in sorted(pydoc_data.topics.topics.items())]
    for path in _stdlib_files():
        doc = _module_docstrings(path, _module_name(path))
        if doc:
            docs.append(doc)
    return docs


def stdlib_source_documents() -> list[str]:
    """The standard library's source files, one document each."""
    return [text for path in _stdlib_files() if (text := _read_source(path))]


def _local_files(path: str) -> tuple[str, list[str]]:
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = sorted(str(p) for p in Path(expanded).rglob("*") if p.suffix in _FILE_FORMATS)
    else:
        files = sorted(glob.glob(expanded, recursive=True))
    if not files:
        raise CorpusError(
            f"no corpus files found at {path!r}; expected text (.txt/.md), .jsonl or .parquet files"
        )
    formats = {_FILE_FORMATS.get(Path(f).suffix) for f in files}
    if None in formats or len(formats) != 1:
        raise CorpusError(
            f"corpus files at {path!r} must share one format among {sorted(_FILE_FORMATS)}; found suffixes "
            f"{sorted({Path(f).suffix for f in files})}"
        )
    return formats.pop(), files


def load_documents(cfg: CorpusConfig):
    """The corpus as a `datasets.Dataset` (embedded, files) or `IterableDataset` (hub, streamed)."""
    import datasets

    if cfg.source in ("pydoc", "stdlib_source"):
        docs = pydoc_documents() if cfg.source == "pydoc" else stdlib_source_documents()
        ds = datasets.Dataset.from_dict({cfg.text_field: docs})
    elif cfg.source == "files":
        if not cfg.path:
            raise CorpusError("corpus.source=files needs corpus.path (a file, glob or directory)")
        fmt, files = _local_files(cfg.path)
        if all(os.path.getsize(f) == 0 for f in files):
            raise CorpusError(f"the corpus at {cfg.path!r} is empty: every file has 0 bytes")
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train")
        except datasets.exceptions.DatasetGenerationError as err:
            raise CorpusError(
                f"could not read the {fmt} corpus files at {cfg.path!r}: {err.__cause__ or err}"
            ) from err
    else:  # hub (CorpusConfig allows no other source)
        if not cfg.path:
            raise CorpusError("corpus.source=hub needs corpus.path, a hub dataset id")
        ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split, streaming=True)
        if cfg.shuffle_seed is not None:
            ds = ds.shuffle(seed=cfg.shuffle_seed, buffer_size=cfg.shuffle_buffer)
        return ds
    if cfg.text_field not in ds.column_names:
        raise CorpusError(
            f"corpus has no column {cfg.text_field!r}; columns: {ds.column_names} (set corpus.text_field)"
        )
    if cfg.shuffle_seed is not None:
        ds = ds.shuffle(seed=cfg.shuffle_seed)
    return ds


def corpus_id(cfg: CorpusConfig) -> str:
    """Identifies the document stream; embedded corpora depend on the Python version."""
    if cfg.source in ("pydoc", "stdlib_source"):
        origin = f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    else:
        origin = f"{cfg.path}:{cfg.subset}:{cfg.split}"
    return f"{cfg.source}:{origin}:shuffle={cfg.shuffle_seed}"


def iter_texts(dataset, text_field: str = "text") -> Iterator[str]:
    for row in dataset:
        text = row[text_field]
        if text:
            yield text


def _token_batches(
    texts: Iterable[str], tokenizer, bos_policy: str, bos_id: int | None, eos_id: int | None, batch_docs: int
) -> Iterator[np.ndarray]:
    """The token ids of `batch_docs` documents at a time, each with its separator, as one int32 array
    (numpy, not Python lists: tokenization runs on a thread beside the model forward, and the less
    it holds the interpreter lock the less it slows the forward's Python)."""
    batch: list[str] = []

    def flush() -> np.ndarray:
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        parts = []
        for ids in encoded:
            if bos_policy == "document":
                parts += [np.array([bos_id], np.int32), np.asarray(ids, np.int32)]
            else:
                parts.append(np.asarray(ids, np.int32))
                if eos_id is not None:
                    parts.append(np.array([eos_id], np.int32))
        return np.concatenate(parts) if parts else np.empty(0, np.int32)

    for text in texts:
        batch.append(text)
        if len(batch) == batch_docs:
            yield flush()
            batch = []
    if batch:
        yield flush()


def special_token_ids(tokenizer) -> tuple[int | None, int | None]:
    """(BOS, EOS) ids; a tokenizer without BOS uses EOS in its place, as GPT-2 does."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return bos, eos


def pack_windows(
    texts: Iterable[str], tokenizer, context_length: int, bos_policy: str = "window", batch_docs: int = 64
) -> Iterator[torch.Tensor]:
    """Yield int32 [context_length] windows packed from the document stream."""
    if bos_policy not in BOS_POLICIES:
        raise CorpusError(f"unknown BOS policy {bos_policy!r}; expected one of {BOS_POLICIES}")
    if context_length < 2:
        raise CorpusError(f"context_length must be at least 2, got {context_length}")
    bos, eos = special_token_ids(tokenizer)
    if bos_policy != "none" and bos is None:
        raise CorpusError(
            f"the tokenizer has neither BOS nor EOS token; use bos_policy=none (got {bos_policy!r})"
        )
    prefix = [bos] if bos_policy == "window" else []
    body = context_length - len(prefix)
    pending = np.empty(0, np.int32)  # tokens not yet in a window
    produced = 0
    seen = 0
    for ids in _token_batches(texts, tokenizer, bos_policy, bos, eos, batch_docs):
        seen += len(ids)
        stream = np.concatenate([pending, ids])
        n = len(stream) // body
        windows = stream[: n * body].reshape(n, body)
        if prefix:
            windows = np.concatenate([np.full((n, 1), bos, np.int32), windows], 1)
        yield from torch.from_numpy(np.ascontiguousarray(windows))
        produced += n
        pending = stream[n * body :]
    if produced == 0:
        raise CorpusError(
            f"the corpus holds {seen} tokens, fewer than one window of {context_length}; "
            "use a larger corpus or a smaller context_length"
        )


def window_groups(windows: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The windows `size` at a time, stacked: int32 [size, context_length] (the last group may be shorter)."""
    while group := list(itertools.islice(windows, size)):
        yield torch.stack(group)
