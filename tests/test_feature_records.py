"""The parts of a feature record that need no model: which features get details, and the panel
summary in features.json's meta (the records themselves: test_analyze.py, through the stage)."""

import torch

from pipeline.feature_records import detail_features, panel_summary


def test_detail_features_spread_over_the_frequency_ranking_and_skip_silent_ones():
    frequency = torch.tensor([0.5, 0.0, 0.1, 0.3, 0.0, 0.01, 0.2])  # ranking: 0, 3, 6, 2, 5; 1 and 4 silent
    assert detail_features(frequency, 3) == [0, 6, 5]  # most frequent, middle, rarest live one
    assert detail_features(frequency, -1) == detail_features(frequency, 99) == [0, 3, 6, 2, 5]


def test_panel_summary_fills_the_meta_once_every_chunk_has_passed():
    def record(rises: tuple[float, float] | None, synthesized: float | None = None) -> dict:
        steering = rises and {"scales": [{"scale": 1.0, "promoted_rise": rises[0]}, {"scale": 4.0, "promoted_rise": rises[1]}]}
        found = None if synthesized is None else [{"start": "random", "activation": synthesized}]
        return {"max_activation": 2.0, "steering": steering, "synthesized": found}

    chunks = [[record((0.3, -0.1), 1.0), record(None)], [record((0.2, 0.5), 3.0)]]
    meta: dict = {}
    passed = panel_summary(iter(chunks), meta)
    assert next(passed) == chunks[0] and meta == {}
    assert list(passed) == [chunks[1]]
    assert meta == {"steering_promoted_rise": {"1.0": 1.0, "4.0": 0.5}, "steered_features": 2,
                    "synthesized_over_corpus_max": {"random": 1.0}}  # fmt: skip

