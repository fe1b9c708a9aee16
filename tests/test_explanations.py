import random

import pytest

from pipeline.explanations import Text, auroc, fuzzing_items, judged, record_texts, token_list


def test_marks_go_on_the_tokens_near_the_peak():
    text = Text(["a", "b", "c", "d"], [0.0, 1.0, 0.5, 0.2])
    assert text.firing() == [1, 2] and text.marked() == "a<<b>><<c>>d" and text.plain() == "abcd"
    assert text.marked([0]) == "<<a>>bcd"
    assert Text(["a"], [0.0]).firing() == []


def test_fuzzing_pairs_each_text_marked_right_with_one_marked_elsewhere():
    texts = [Text(list("abcdef"), [0, 0, 3.0, 0, 0, 0]), Text(list("xy"), [1.0, 1.0])]  # the second: no other tokens
    items = fuzzing_items(texts, random.Random(0))
    assert [label for _, label in items] == [1, 0]
    right, wrong = items[0][0], items[1][0]
    assert right == "ab<<c>>def" and wrong.count("<<") == 1 and "<<c>>" not in wrong


def test_scores_of_a_judge():
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5  # ties count half
    always_yes = judged([0.9, 0.9, 0.9, 0.9], [1, 1, 0, 0])
    assert always_yes["accuracy"] == 0.5 and always_yes["auroc"] == 0.5 and always_yes["items"] == 4
    assert judged([0.9, 0.1, 0.2], [1, 0, 0])["accuracy"] == 1.0
    assert auroc([0.3], [1]) != auroc([0.3], [1])  # NaN: nothing to rank against
    nothing = judged([], [])
    assert nothing["accuracy"] != nothing["accuracy"] and nothing["items"] == 0  # NaN, not a score of 0


def test_texts_from_dashboard_examples_and_the_token_list_baseline():
    texts = record_texts([{"ids": [0, 1, 5], "acts": [0.0, 2.0, 0.0]}], ["x", "y"])
    assert texts[0].tokens == ["x", "y", "<5>"] and texts[0].marked() == "x<<y>><5>"
    assert token_list(["def", " return"]) == "the tokens 'def', ' return'"


@pytest.mark.parametrize("bad", [[0.5], [0.5, 0.5, 0.5]])
def test_lengths_must_match(bad):
    with pytest.raises(ValueError):
        judged(bad, [1, 0])
