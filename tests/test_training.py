from pipeline.training import TrainConfig


def test_learning_rate_and_schedule_follow_the_optimizer_unless_given():
    assert TrainConfig().learning_rate(2**14) == 5e-3 and TrainConfig().schedule() == "constant"
    assert TrainConfig().learning_rate(4 * 2**14) == 2.5e-3  # scaled by d_sae ** -0.5
    adam = TrainConfig(optimizer="adam")
    assert adam.learning_rate(2**14) == 2e-3 and adam.schedule() == "linear"
    given = TrainConfig(lr_base=1e-3, lr_decay="cosine")
    assert given.learning_rate(2**14) == 1e-3 and given.schedule() == "cosine"
    assert TrainConfig(lr=0.1).learning_rate(2**16) == 0.1
