from dataclasses import replace

import pytest

from pipeline.dictionaries import DictionaryError, shards_for
from pipeline.rundir import RunDir

HOOK = "blocks.1.resid_post"


def test_stored_windows_are_read_by_any_model_of_the_same_vocabulary(trained_run, loaded):
    run = RunDir.open(trained_run)
    vocabulary = loaded.tokenizer_id.rpartition("#")[2]
    fine_tuned = replace(loaded, tokenizer_id=f"outputs/tuned/checkpoints/step-000010#{vocabulary}")
    assert shards_for(run, HOOK, fine_tuned).n_tokens > 0
    with pytest.raises(DictionaryError, match="whose vocabulary differs from this model's tokenizer"):
        shards_for(run, HOOK, replace(loaded, tokenizer_id=f"{loaded.model_id}#vocab-000000000000"))


def test_a_transcoder_must_name_what_it_predicts(transcoder_run, tmp_path):
    """Every stage finds a run's transcoders; one whose cfg.json lacks hook_out says what to add."""
    import json
    import shutil

    from pipeline.dictionaries import find_dictionaries

    found = find_dictionaries(RunDir.open(transcoder_run), [], None, False, "compare")
    assert sorted(d.name for d in found) == ["transcoder-k8-x4", "transcoder-skip-k8-x4"]
    bare = shutil.copytree(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-k8-x4", tmp_path / "bare")
    cfg = json.loads((bare / "cfg.json").read_text())
    del cfg["hook_out"]
    (bare / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryError, match='names no hook_out .*add e.g. "hook_out": "blocks.3.mlp_out"'):
        find_dictionaries(None, [str(bare)], None, False, "evaluate")
