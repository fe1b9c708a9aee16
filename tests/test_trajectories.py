import torch

from pipeline.trajectories import (
    APPEARED,
    KEPT,
    SHIFTED,
    SILENT,
    VANISHED,
    classify,
    first_change,
    reference_codes,
    relevance_of_moved,
    step_stats,
)


def _codes() -> list[torch.Tensor]:
    """Two batches of codes [positions, 5 features]: 0 and 1 fire often, 2 rarely, 3 and 4 never."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        z = torch.zeros(50, 5)
        z[:, 0] = torch.rand(50, generator=gen) * (torch.rand(50, generator=gen) < 0.5)
        z[:, 1] = torch.rand(50, generator=gen) * (torch.rand(50, generator=gen) < 0.5)
        z[:3, 2] = 1.0
        batches.append(z)
    return batches


def test_theta_zero_against_itself_keeps_every_firing_feature():
    codes = _codes()
    reference = reference_codes(codes)
    first = step_stats(codes, reference)
    assert first.positions == 100 and torch.allclose(first.frequency, first.count / 100)
    torch.testing.assert_close(first.cosine[:3], torch.ones(3, dtype=torch.float64))
    assert first.cosine[3:].isnan().all()  # silent: no direction to compare
    status = classify(first, first, kept=0.8, vanished=0.1, appeared=2)
    assert status.tolist() == [KEPT, KEPT, KEPT, SILENT, SILENT]


def test_features_that_move_vanish_or_appear_are_told_apart():
    codes = _codes()
    reference = reference_codes(codes)
    first = step_stats(codes, reference)
    moved = []
    for z in codes:
        z = z.clone()
        z[:, 0] *= 3.0  # fires on the same positions, more strongly: the cosine stays 1
        z[:, 1] = z[:, 1].roll(7)  # the same strength on other positions: a low cosine
        z[:, 2] = 0.0  # gone
        z[:5, 4] = 1.0  # fires where it never did
        moved.append(z)
    later = step_stats(moved, reference)
    assert later.cosine[0] > 0.999 and later.cosine[1] < 0.8
    status = classify(first, later, kept=0.8, vanished=0.1, appeared=10)
    assert status.tolist() == [KEPT, SHIFTED, VANISHED, SILENT, APPEARED]
    statuses = torch.stack([classify(first, s, 0.8, 0.1, 10) for s in (first, first, later)])
    assert first_change(statuses).tolist() == [-1, 2, 2, -1, 2]


def test_the_moved_share_of_the_task_features_against_all():
    effect = torch.tensor([5.0, -4.0, 0.1, 0.2, 3.0, 0.0], dtype=torch.float64)
    task_count = torch.tensor([9, 9, 9, 9, 9, 0], dtype=torch.float64)
    movement = torch.tensor([0.9, 0.8, 0.0, 0.1, 0.7, 0.5], dtype=torch.float64)
    moved = movement > 0.5
    alive = torch.ones(6, dtype=torch.bool)
    result = relevance_of_moved(effect, task_count, movement, moved, alive, top=3)
    assert result["top_relevant"] == [0, 1, 4]  # by |effect|, firing on the task
    assert result["moved_share_of_top_relevant"] == 1.0 and result["moved_share_of_all"] == 0.5
    assert abs(result["spearman_relevance_vs_movement"] - 1.0) < 1e-9
