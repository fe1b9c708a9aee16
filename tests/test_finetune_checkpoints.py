import json

from pipeline.finetune_checkpoints import DONE, finished_steps, step_dir


def test_steps_are_listed_in_order_and_a_half_written_one_is_left_out(tmp_path):
    out = tmp_path / "tuned"
    for step, done in ((10, True), (20, False), (5, True)):
        step_dir(out, step).mkdir(parents=True)
        if done:
            (step_dir(out, step) / DONE).write_text("{}")
    assert finished_steps(out) == [(5, step_dir(out, 5)), (10, step_dir(out, 10))]
    settings = json.dumps({"steps": 30})
    (out / DONE).write_text(settings)
    assert finished_steps(out) == [(30, out)]  # the steps' markers hold other settings: another fine-tuning's
    for step in (5, 10):
        (step_dir(out, step) / DONE).write_text(settings)
    assert finished_steps(out) == [(5, step_dir(out, 5)), (10, step_dir(out, 10)), (30, out)]


def test_a_directory_without_fine_tuning_lists_nothing(tmp_path):
    assert finished_steps(tmp_path) == []
