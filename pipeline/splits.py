"""Which stored windows each stage reads.

Activations are stored as whole windows of `context_length` tokens, and every split falls on a window
boundary, so no window is half trained on and half evaluated:

    | training split                                 | held-out split: the last holdout_tokens, |
    | train draws shuffled tokens from here           | rounded up to whole windows              |
                                                        evaluate starts here, or after the
                                                        dictionary's recorded training split
Analyze and compare read the leading windows of the whole set.
"""

from __future__ import annotations

from pipeline.errors import PipelineError


class SplitError(PipelineError, ValueError):
    """The stored windows cannot give the split asked for; the message says what to change."""


def whole_windows(tokens: int, context_length: int) -> int:
    """How many windows hold `tokens` tokens (rounded up)."""
    return -(-tokens // context_length)


def leading_windows(n_windows: int, context_length: int, tokens: int | None) -> int:
    """The first windows that hold `tokens` tokens (all `n_windows` when None, or when fewer)."""
    return n_windows if tokens is None else min(n_windows, whole_windows(tokens, context_length))


def heldout_start(n_tokens: int, context_length: int, holdout_tokens: int) -> int:
    """The first held-out token: the last `holdout_tokens` tokens, rounded up to whole windows, are
    kept out of training (0 when that is every token)."""
    held = whole_windows(max(holdout_tokens, 0), context_length) * context_length
    return max(0, n_tokens - held)


def evaluation_start(
    n_tokens: int, context_length: int, training_splits: list[int | None], holdout_tokens: int
) -> int:
    """The first token none of the dictionaries trained on, on a window boundary. `training_splits`:
    each dictionary's recorded training split (its cfg.json), None where it records none (a dictionary
    from elsewhere: the held-out split of `holdout_tokens` is assumed)."""
    default = heldout_start(n_tokens, context_length, holdout_tokens)
    start = max(default if split is None else int(split) for split in training_splits)
    return whole_windows(start, context_length) * context_length


def evaluation_windows(
    n_windows: int, context_length: int, start: int, tokens: int | None, where: str
) -> tuple[int, int]:
    """(first window, number of windows) to evaluate on: from token `start` on, enough windows for
    `tokens` tokens (all that are left when None). `where` names the shard set in errors."""
    available = n_windows - start // context_length
    if available < 1:
        raise SplitError(
            f"too few evaluation tokens: {where} holds {n_windows * context_length} tokens and all of them "
            "were used in training; harvest more (raise harvest.tokens) or train with a larger holdout_tokens"
        )
    wanted = available if tokens is None else whole_windows(tokens, context_length)
    if wanted > available:
        raise SplitError(
            f"evaluate.tokens={tokens} asks for more than the {available * context_length} held-out tokens "
            f"in {where} (the rest was trained on); lower evaluate.tokens or harvest more"
        )
    return start // context_length, wanted
