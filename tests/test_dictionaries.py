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


def test_transcoders_go_to_the_stages_that_take_them(transcoder_run, tmp_path):
    """evaluate / analyze / explain / steer / relevance / track take transcoders; the other stages skip them among a run's
    dictionaries and refuse one named; one without hook_out says what to add."""
    import json
    import shutil

    from pipeline.dictionaries import find_dictionaries

    run = RunDir.open(transcoder_run)
    assert len(find_dictionaries(run, [], None, False, "evaluate")) == 2
    assert find_dictionaries(run, [], None, False, "compare") == []
    with pytest.raises(DictionaryError, match=r"compare works on SAEs, and .* is a transcoder \(reads blocks.1.mlp_in, predicts blocks.1.mlp_out\)"):
        find_dictionaries(run, ["transcoder-k8-x4"], None, False, "compare")
    bare = shutil.copytree(transcoder_run / "sae" / "blocks.1.mlp_in" / "transcoder-k8-x4", tmp_path / "bare")
    cfg = json.loads((bare / "cfg.json").read_text())
    del cfg["hook_out"]
    (bare / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryError, match='names no hook_out .*add e.g. "hook_out": "blocks.3.mlp_out"'):
        find_dictionaries(None, [str(bare)], None, False, "evaluate")
