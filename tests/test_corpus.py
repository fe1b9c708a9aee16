import pytest
import torch

from pipeline.corpus import (
    CorpusConfig,
    CorpusError,
    corpus_id,
    iter_texts,
    load_documents,
    pack_windows,
    pydoc_documents,
)
from tests.conftest import write_jsonl

DOCS = ["alpha beta gamma delta", "one two three", "the quick brown fox jumps over the lazy dog " * 3, "x"]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_window_policy_starts_every_window_with_bos(tokenizer):
    windows = list(pack_windows(DOCS, tokenizer, 8, "window"))
    stream = [t for d in DOCS for t in [*_ids(tokenizer, d), tokenizer.eos_token_id]]
    assert all(w.dtype == torch.int32 and len(w) == 8 and w[0] == tokenizer.bos_token_id for w in windows)
    bodies = [t for w in windows for t in w[1:].tolist()]
    assert bodies == stream[: len(bodies)]
    assert len(stream) - len(bodies) < 7  # only the tail shorter than a window is dropped


def test_document_policy_prefixes_every_document(tokenizer):
    windows = list(pack_windows(DOCS, tokenizer, 8, "document"))
    stream = [t for d in DOCS for t in [tokenizer.bos_token_id, *_ids(tokenizer, d)]]
    flat = torch.cat(windows).tolist()
    assert flat == stream[: len(flat)]


def test_none_policy_has_no_bos(tokenizer):
    windows = list(pack_windows(DOCS, tokenizer, 8, "none"))
    assert tokenizer.bos_token_id not in torch.cat(windows).tolist()


def test_packing_is_independent_of_tokenizer_batching(tokenizer):
    a = torch.stack(list(pack_windows(DOCS * 5, tokenizer, 16, "window", batch_docs=1)))
    b = torch.stack(list(pack_windows(DOCS * 5, tokenizer, 16, "window", batch_docs=64)))
    assert torch.equal(a, b)


def test_too_short_or_empty_corpus(tokenizer):
    with pytest.raises(CorpusError, match="fewer than one window of 512"):
        list(pack_windows(DOCS, tokenizer, 512))
    with pytest.raises(CorpusError, match="holds 0 tokens"):
        list(pack_windows([], tokenizer, 8))
    with pytest.raises(CorpusError, match="unknown BOS policy"):
        list(pack_windows(DOCS, tokenizer, 8, "sometimes"))


def test_local_files_jsonl_and_text(tmp_path, text_corpus):
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    ds = load_documents(CorpusConfig(source="files", path=str(path), shuffle_seed=None))
    assert list(iter_texts(ds)) == DOCS
    texts = list(iter_texts(load_documents(text_corpus)))
    assert len(texts) == 40


def test_shuffle_is_deterministic_for_a_seed(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [f"document {i}" for i in range(50)])

    def order(seed):
        return list(
            iter_texts(load_documents(CorpusConfig(source="files", path=str(path), shuffle_seed=seed)))
        )

    assert order(3) == order(3)
    assert order(3) != order(4)
    assert sorted(order(3)) == sorted(order(None))


def test_bad_file_corpora(tmp_path):
    with pytest.raises(CorpusError, match="no corpus files found"):
        load_documents(CorpusConfig(source="files", path=str(tmp_path / "missing*.jsonl")))
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(CorpusError, match="share one format"):
        load_documents(CorpusConfig(source="files", path=str(tmp_path)))
    with pytest.raises(CorpusError, match="no column 'body'"):
        load_documents(CorpusConfig(source="files", path=str(tmp_path / "b.jsonl"), text_field="body"))
    with pytest.raises(
        CorpusError, match="corpus.source='web' is not one of pydoc, stdlib_source, hub, files"
    ):
        load_documents(CorpusConfig(source="web"))


def test_embedded_pydoc_corpus():
    docs = pydoc_documents()
    assert 2_000_000 < sum(map(len, docs)) < 3_000_000
    assert any(d.startswith("json\n\n") for d in docs)  # stdlib module docstrings
    assert "python-3" in corpus_id(CorpusConfig())
