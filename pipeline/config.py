"""Typed stage configs: Hydra/OmegaConf nodes validated against dataclass schemas."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")

# conf/ sits beside the package (an editable install, as `make install` does, keeps it there).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def to_dataclass(cls: type[T], node: DictConfig | dict) -> T:
    """Merge `node` onto the dataclass `cls` (type-checking every field) and build the instance.

    Unknown keys and wrongly typed values raise an error naming the key; the dataclass'
    `__post_init__` then checks the values themselves.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)  # interpolations may point outside `node`
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), node))
