"""Sparse autoencoders: `from pipeline.sae import Sae; sae = Sae.load(directory)`.

Architectures register themselves by name (`architecture` in cfg.json; `architectures()` lists
them): relu, topk, batchtopk, jumprelu, matryoshka_batchtopk and transcoder (which
predicts another hook's activations), one module each. `build_sae(cfg, d_in)` makes a fresh one.
"""

from pipeline.sae import batchtopk, jumprelu, matryoshka, relu, topk, transcoder  # noqa: F401  (registers the architectures)
from pipeline.sae.base import ForwardOutput, Sae, SaeConfig, TrainOutput, architectures


def build_sae(cfg: SaeConfig, d_in: int, meta: dict | None = None) -> Sae:
    """A freshly initialized SAE of `cfg.architecture` for inputs of width d_in."""
    return architectures()[cfg.architecture](cfg, d_in, meta)


__all__ = ["ForwardOutput", "Sae", "SaeConfig", "TrainOutput", "architectures", "build_sae"]
