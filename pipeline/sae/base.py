"""The SAE base class: parameters, encode / decode, initialization, decoder norms, save / load.

    pre   = (x - b_dec) @ W_enc + b_enc          W_enc [d_in, d_sae], b_enc [d_sae]
    z     = activation(pre)                      per architecture (ReLU, TopK, BatchTopK, JumpReLU)
    x_hat = z @ W_dec + b_dec                    W_dec [d_sae, d_in], rows of unit norm, b_dec [d_in]

A saved SAE acts on raw model activations: a training-time input scale is folded into the weights
by `fold_input_scale`. One directory per dictionary: `sae.safetensors` + `cfg.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pipeline.config import check_settings
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write

FORMAT_VERSION = 2  # 2: held-out `silent_fraction` (was `dead_fraction_heldout`)
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
AUX_LATENTS_PER_K = 2  # AuxK's default k_aux, in multiples of k
_REGISTRY: dict[str, type[Sae]] = {}


class SaeConfigError(PipelineError, ValueError):
    """A dictionary's settings are out of range or do not fit its input; the message names the key."""


@dataclass
class SaeConfig:
    """Architecture and size of one dictionary, with its architecture-specific loss settings."""

    architecture: str = "batchtopk"
    """A registered architecture (`architectures()`): relu | topk | batchtopk | jumprelu |
    matryoshka_batchtopk | transcoder."""
    d_in: int | None = None
    """Expected input width, checked against the activations; null takes it from them."""
    expansion: int = 16
    """d_sae = expansion * d_in, unless d_sae is given."""
    d_sae: int | None = None
    k: int = 32
    """Active latents per token (topk, batchtopk: mean over the batch)."""
    k_aux: int | None = None
    """AuxK: dead latents used to model the residual; null = `AUX_LATENTS_PER_K` x k, d_in / 2 for a
    transcoder without skip (`aux_latents`)."""
    aux_rescale: bool = True
    """AuxK: dead latents model the residual scaled to the input's variance, so that their codes
    reach a live latent's size (false: the residual itself, Gao et al.'s)."""
    aux_coefficient: float | None = None
    """Weight of the AuxK loss; null = the architecture's rule (`aux_weight`). Gao et al. use 1/32 for
    long runs; short runs need dead latents revived sooner (the README's rule table)."""
    balance: float | None = None
    """batchtopk: the exponent a of each latent's selection weight (rate / mean rate)^-a, so that
    rarely firing latents win places in the batch selection more easily and frequent ones less;
    inference keeps it as a threshold per latent. null = the architecture's rule (`balance_exponent`);
    0: Bussmann et al.'s selection by the pre-activation alone."""
    l1_coefficient: float = 5.0
    """relu: weight of sum_i |z_i| * ||W_dec,i|| (with inputs normalized to E||x||^2 = d_in)."""
    l0_coefficient: float = 1.0
    """jumprelu: weight of the L0 penalty (straight-through estimator)."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the straight-through estimators."""
    jumprelu_init_threshold: float = 0.05
    matryoshka_widths: list[int] | None = None
    """matryoshka_batchtopk: the nested prefix sizes, increasing, the last d_sae; null: d_sae / 16,
    / 8, / 4, / 2 and d_sae."""
    skip: bool = False
    """transcoder: add a learned linear map of the input to the prediction (a skip transcoder)."""
    name: str | None = None
    """Directory name under sae/<hook>/; default like `batchtopk-k32-x16`."""

    def __post_init__(self) -> None:
        if self.architecture not in _REGISTRY:
            raise SaeConfigError(
                f"unknown SAE architecture {self.architecture!r}; expected one of {', '.join(sorted(_REGISTRY))}"
            )
        check_settings(
            self, "sae", SaeConfigError,
            positive=("expansion", "d_in", "d_sae", "k", "k_aux", "jumprelu_bandwidth", "jumprelu_init_threshold"),
            non_negative=("aux_coefficient", "balance", "l1_coefficient", "l0_coefficient"),
        )  # fmt: skip
        if self.balance and not _REGISTRY[self.architecture].selects_per_batch:
            raise SaeConfigError(
                f"sae.balance={self.balance} weighs BatchTopK's batch selection, but {self.architecture!r} "
                "selects no codes over the batch; drop it or choose sae=batchtopk"
            )
        if self.skip and not _REGISTRY[self.architecture].transcodes:
            raise SaeConfigError(
                f"sae.skip=true adds a skip term to a transcoder, but this is {self.architecture!r}; "
                "drop it or choose sae=transcoder"
            )

    def aux_latents(self, d_in: int) -> int:
        """AuxK's k_aux: as set, else twice k. Fewer dead latents share the residual than Gao et al.'s
        d_in / 2, so each takes a larger code and reaches the top k sooner (the README's rule table).
        A transcoder without a skip term keeps d_in / 2: its latents alone carry the MLP's output,
        linear part included, and with 2 k its FVU was 7 % higher (the README's Transcoders)."""
        if self.k_aux:
            return self.k_aux
        plain_transcoder = _REGISTRY[self.architecture].transcodes and not self.skip
        return d_in // 2 if plain_transcoder else AUX_LATENTS_PER_K * self.k

    def aux_weight(self, d_in: int) -> float:
        """AuxK's weight: as set, else the architecture's rule in k and d_sae (`Sae.default_aux_weight`)."""
        if self.aux_coefficient is not None:
            return self.aux_coefficient
        return _REGISTRY[self.architecture].default_aux_weight(self.k, self.width(d_in))

    def balance_exponent(self, d_in: int) -> float:
        """The selection weight's exponent: as set, else the architecture's rule in k and d_sae
        (`Sae.default_balance`)."""
        if self.balance is not None:
            return self.balance
        return _REGISTRY[self.architecture].default_balance(self.k, self.width(d_in))

    def width(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in

    def active_per_token(self) -> int | None:
        """k where the architecture fixes the active latents per token by it, else None (a penalty)."""
        return self.k if _REGISTRY[self.architecture].uses_k else None

    def check_input_width(self, d_in: int) -> None:
        """Raise ValueError unless a dictionary of this config can read inputs of width d_in."""
        if self.d_in is not None and self.d_in != d_in:
            raise SaeConfigError(
                f"the SAE config expects inputs of width {self.d_in}, but the activations hold d_model {d_in}; "
                "fix sae.d_in (or drop it) or use other activations"
            )
        d_sae = self.width(d_in)
        self._check_matryoshka_widths(d_sae)
        if _REGISTRY[self.architecture].uses_k and self.k >= d_sae:
            raise SaeConfigError(
                f"sae.k={self.k} must be smaller than d_sae={d_sae} (expansion {self.expansion} x d_in {d_in})"
            )
        if _REGISTRY[self.architecture].uses_k and self.k_aux is not None and self.k_aux >= d_sae:
            raise SaeConfigError(
                f"sae.k_aux={self.k_aux} (AuxK's dead latents per token) must be smaller than d_sae={d_sae}; "
                "lower it or set sae.k_aux=null (2 k)"
            )

    def _check_matryoshka_widths(self, d_sae: int) -> None:
        widths = self.matryoshka_widths
        if widths is None:
            return
        if self.architecture != "matryoshka_batchtopk":
            raise SaeConfigError(
                f"sae.matryoshka_widths is set, but only sae=matryoshka_batchtopk uses it (this is "
                f"{self.architecture!r}); drop it or choose that architecture"
            )
        steps = zip([0, *widths], widths, strict=False)
        if not widths or widths[-1] != d_sae or any(not isinstance(b, int) or b <= a for a, b in steps):
            raise SaeConfigError(
                f"sae.matryoshka_widths={list(widths)} must be increasing whole prefix sizes ending at d_sae={d_sae}; "
                f"e.g. [{d_sae // 4}, {d_sae // 2}, {d_sae}], or null for the default"
            )

    def default_name(self) -> str:
        if self.name:
            return self.name
        size = f"x{self.expansion}" if self.d_sae is None else f"d{self.d_sae}"
        sparsity = f"-k{self.k}" if _REGISTRY[self.architecture].uses_k else ""
        return f"{self.architecture}{'-skip' if self.skip else ''}{sparsity}-{size}"


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor
    """Reconstruction [batch, d_in]."""
    codes: torch.Tensor
    """Latent activations [batch, d_sae] (dense)."""


class TrainOutput(NamedTuple):
    x_hat: torch.Tensor
    """Reconstruction [batch, d_in] of the (normalized) input."""
    loss: torch.Tensor
    """The scalar to minimize."""
    terms: dict[str, torch.Tensor]
    """Named loss terms, for logging (detached)."""
    fired: torch.Tensor
    """On how many of the batch's tokens each latent was active: int32 [d_sae] (dead-latent tracking,
    firing rates)."""
    l0: torch.Tensor
    """Mean active latents per token."""


def dense_train_output(
    x_hat: torch.Tensor, loss: torch.Tensor, terms: dict, codes: torch.Tensor
) -> TrainOutput:
    """TrainOutput of an architecture that computes dense codes [batch, d_sae]."""
    active = codes > 0
    return TrainOutput(x_hat, loss, terms, active.sum(0, dtype=torch.int32), active.sum(1).float().mean())


class Sae(nn.Module):
    """Base class; subclasses set `architecture` and define `activation` and `training_forward`."""

    architecture: ClassVar[str]
    uses_k: ClassVar[bool] = False
    """The sparsity is set by `k` active latents per token (not by a penalty)."""
    has_threshold: ClassVar[bool] = False
    """A `threshold` buffer [d_sae] is part of the weights (inference-time activation threshold)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are kept at unit norm during training (normalize_decoder, parallel-grad removal)."""
    transcodes: ClassVar[bool] = False
    """Reads the activations at one hook and predicts those at another (`hook_out` in its metadata)
    instead of reconstructing its input."""
    selects_per_batch: ClassVar[bool] = False
    """Training picks the codes over the whole batch (BatchTopK), which `cfg.balance` can weigh."""

    @staticmethod
    def default_aux_weight(k: int, d_sae: int) -> float:
        """AuxK's weight where sae.aux_coefficient is null: fixed for TopK, whose dead latents it
        hardly changed at 1.0 (the README's rule table)."""
        return 0.25

    @staticmethod
    def default_balance(k: int, d_sae: int) -> float:
        """The balanced selection's exponent where sae.balance is null: 0, the plain selection (only
        BatchTopK selects over the batch)."""
        return 0.0

    def __init_subclass__(cls, architecture: str, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.architecture = architecture
        _REGISTRY[architecture] = cls

    def __init__(self, cfg: SaeConfig, d_in: int, meta: dict | None = None):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(f"{type(self).__name__} built with a {cfg.architecture!r} config")
        cfg.check_input_width(d_in)
        d_sae = cfg.width(d_in)
        self.cfg, self.d_in, self.d_sae = cfg, d_in, d_sae
        self.meta = dict(meta or {})
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if self.has_threshold:
            self.register_buffer("threshold", torch.zeros(d_sae))
        self.reset_parameters()

    # ------------------------------------------------------------ math

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of raw activations x [..., d_in]."""
        return self.activation(self.pre_acts(x))

    def decode(self, z: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """Reconstruction [..., d_in] from latents [..., d_sae], or from the first `stop` latents
        z [..., stop] alone."""
        return z @ self.W_dec[:stop] + self.b_dec

    def nested_widths(self) -> list[int]:
        """The prefix sizes each trained to reconstruct on their own (matryoshka), the last d_sae."""
        return [self.d_sae]

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        z = self.encode(x)
        return ForwardOutput(self.decode(z), z)

    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor, variance: torch.Tensor, sparsity_scale: float = 1.0
    ) -> TrainOutput:
        """Loss on a (normalized) batch x [batch, d_in]. `dead_mask` [d_sae]: latents counted as dead
        (AuxK revives them); `variance`: mean over all processes' tokens of ||x - mean(x)||^2 (the FVU
        denominator); `sparsity_scale` in [0, 1] warms a sparsity penalty up."""
        raise NotImplementedError

    def observe_firing(self, counts: torch.Tensor, tokens: int) -> None:
        """After a training step: each latent fired on counts [d_sae] of the batch's `tokens` (all
        processes'). Nothing here; BatchTopK follows its latents' firing rates."""

    # ------------------------------------------------------------ init and constraints

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Decoder rows random with unit norm; encoder = decoder transposed; biases zero."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        """b_dec at the geometric median of a sample [n, d_in] of what it reconstructs (Weiszfeld
        iterations from the mean); `inputs`: the inputs of the same tokens, where they differ (transcoders)."""
        self.b_dec.copy_(geometric_median(sample.float()))

    @torch.no_grad()
    def calibrate(self, sample: torch.Tensor, batch_size: int) -> None:
        """Set from training tokens [n, d_in], on the final weights, what inference needs besides
        them (BatchTopK: its threshold); nothing for most architectures."""

    def latent_parameters(self) -> list[tuple[nn.Parameter, int]]:
        """The parameters holding one slice per latent, with the axis that indexes the latents."""
        return [(self.W_enc, 1), (self.b_enc, 0), (self.W_dec, 0)]

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            normalize_rows_(self.W_dec)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row before a step."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> None:
        """Make a dictionary trained to map `scale * x` to `out_scale * y` (an SAE: y = x, one scale)
        map raw x to raw y: codes shrink by out_scale, W_dec is unchanged."""
        out_scale = scale if out_scale is None else out_scale
        self.W_enc.mul_(scale / out_scale)
        self.b_enc.div_(out_scale)
        self.b_dec.div_(out_scale)
        if self.has_threshold:
            self.threshold.div_(out_scale)

    # ------------------------------------------------------------ files

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the on-disk contract: W_enc, b_enc, W_dec, b_dec (+ threshold)."""
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.has_threshold else [])
        return {name: getattr(self, name) for name in names}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.file_tensors())
        if set(tensors) != expected:
            raise SaeConfigError(f"SAE file holds tensors {sorted(tensors)}, expected {sorted(expected)}")
        for name, tensor in tensors.items():
            target = getattr(self, name)
            if target.shape != tensor.shape:
                raise SaeConfigError(
                    f"SAE tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)

    def digest(self) -> str:
        """sha256 of the saved tensors: identifies these weights (e.g. in the stages' config hashes)."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.file_tensors().items()):
            digest.update(key.encode())  # then the fp32 bytes, hashed in place (no copies of the weights)
            digest.update(memoryview(tensor.detach().float().cpu().contiguous().numpy()).cast("B"))
        return digest.hexdigest()

    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **asdict(self.cfg),
            "aux_coefficient": self.cfg.aux_weight(self.d_in),
            "balance": self.cfg.balance_exponent(self.d_in),
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "decoder_unit_norm": bool(
                torch.allclose(self.W_dec.detach().norm(dim=1), torch.ones(()), atol=1e-3)
            ),
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            **self.meta,
        }

    def save(self, directory: str | Path) -> Path:
        """Write `sae.safetensors`, then `cfg.json` into `directory` (each atomically). cfg.json marks
        the dictionary complete: written last, and removed first so that it never vouches for weights
        being replaced."""
        directory = Path(directory)
        (directory / CONFIG_FILE).unlink(missing_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.file_tensors().items()}
        atomic_write(directory / WEIGHTS_FILE, safetensors_bytes(tensors))
        atomic_write(directory / CONFIG_FILE, json.dumps(self.config_dict(), indent=2).encode())
        return directory

    @classmethod
    def from_config_dict(cls, config: dict) -> Sae:
        config = dict(config)
        arch = config.get("architecture")
        if arch not in _REGISTRY:
            raise SaeConfigError(f"cfg.json names unknown architecture {arch!r}; known: {sorted(_REGISTRY)}")
        fields = SaeConfig.__dataclass_fields__
        sae_cfg = SaeConfig(**{k: v for k, v in config.items() if k in fields})
        sae_cfg.d_sae = config["d_sae"]
        meta = {k: v for k, v in config.items() if k not in fields and k not in _DERIVED_KEYS}
        return _REGISTRY[arch](sae_cfg, config["d_in"], meta)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Sae:
        """Load a dictionary saved by this project, SAELens or sparsify (recognised by its files)."""
        from pipeline.sae.formats import load_any

        return load_any(Path(directory), device)


_DERIVED_KEYS = {"format_version", "d_in", "d_sae", "decoder_unit_norm", "dtype"}


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor) -> torch.Tensor:
    """Scale every row of `weight` to unit norm, in place."""
    return weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(1e-8))


def geometric_median(points: torch.Tensor, iterations: int = 30, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimizing the sum of Euclidean distances to `points` [n, d]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(eps)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() < eps * median.norm().clamp_min(1):
            return updated
        median = updated
    return median


def architectures() -> dict[str, type[Sae]]:
    """Architecture name -> class, for every registered architecture."""
    return dict(_REGISTRY)
