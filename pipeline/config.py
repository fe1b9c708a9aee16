"""Typed stage configs: Hydra/OmegaConf nodes validated against dataclass schemas, and the range
checks every config dataclass runs in `__post_init__` (messages name the setting's full key)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError

T = TypeVar("T")

# conf/ sits beside the package (an editable install, as `make install` does, keeps it there).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class ConfigError(PipelineError, ValueError):
    """A setting has a value or type it cannot have; the message names its key."""


def to_dataclass(cls: type[T], node: DictConfig | dict) -> T:
    """Merge `node` onto the dataclass `cls` (type-checking every field) and build the instance.

    Unknown keys and wrongly typed values raise ConfigError naming the key; the dataclass'
    `__post_init__` then checks the values themselves.
    """
    prefix = ""
    if isinstance(node, DictConfig):
        prefix = f"{node._get_full_key(None)}." if node._get_full_key(None) else ""
        node = OmegaConf.to_container(node, resolve=True)  # interpolations may point outside `node`
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))
    except OmegaConfBaseException as err:
        key = f"{prefix}{getattr(err, 'full_key', '') or ''}"
        message = str(err.msg).splitlines()[0]
        raise ConfigError(f"{key}: {message}; see conf/ or the README for its meaning and type") from err


def check_settings(
    cfg,
    prefix: str,
    error: type[Exception] = ConfigError,
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    fractions: Iterable[str] = (),
    choices: dict[str, Iterable] | None = None,
) -> None:
    """Raise `error` naming `<prefix>.<key>` for the first setting of `cfg` out of range: `positive`
    (> 0), `non_negative` (>= 0), `fractions` (in [0, 1]), `choices` (one of). None passes: it
    stands for a default computed later."""

    def fail(key: str, expected: str) -> None:
        raise error(f"{prefix}.{key}={getattr(cfg, key)!r} {expected}")

    for key in positive:
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            fail(key, "must be positive")
    for key in non_negative:
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            fail(key, "must not be negative")
    for key in fractions:
        if getattr(cfg, key) is not None and not 0 <= getattr(cfg, key) <= 1:
            fail(key, "must lie in [0, 1]")
    for key, allowed in (choices or {}).items():
        allowed = tuple(allowed)
        if getattr(cfg, key) not in allowed:
            fail(key, f"is not one of {', '.join(map(str, allowed))}")
