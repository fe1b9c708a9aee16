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
