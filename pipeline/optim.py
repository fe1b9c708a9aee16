"""Optimizers and learning-rate schedules for SAE training.

Signum here is sign-SGD made schedule-free (Defazio et al. 2024), as sparsify trains with it:
gradients are taken at y = (1 - beta) z + beta x, the iterate z moves by lr * sign(grad), and x is
the running average of z, step t weighted by t^power * lr^2 (the paper's polynomial weighting), so
warm-up steps count less and, with power > 0, the early iterates of a short run count less too
(sparsify's average is uniform: power 0). The parameters hold y while training; `eval_params` swaps
in the average x, which is what gets saved. `lr_scales` multiplies the step of chosen entries of a
parameter (the training loop uses it to move idle latents farther).
"""

from __future__ import annotations

import math

import torch


class Signum(torch.optim.Optimizer):
    """Schedule-free sign-SGD; call `eval_params()` before saving (and `train_params()` to go on).
    `step()` overwrites each gradient with its sign (it is not read after the step)."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.9, power: float = 0.0):
        super().__init__(params, {"lr": lr, "beta": beta, "power": power, "steps": 0, "weight_sum": 0.0})
        self.lr_scales: dict[torch.Tensor, torch.Tensor] = {}
        """{parameter: a tensor broadcasting to it}: its entries step lr * scale for the next step."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint from before `power`: the uniform average
            if "lr_sq_sum" in group:
                group["weight_sum"] = group.pop("lr_sq_sum")
            group.setdefault("power", 0.0)
            group.setdefault("steps", 0)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta = group["lr"], group["beta"]
            group["steps"] += 1
            step_weight = group["steps"] ** group["power"] * lr * lr
            group["weight_sum"] += step_weight
            weight = step_weight / group["weight_sum"] if group["weight_sum"] > 0 else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone()
                    state["x"] = p.detach().clone()
                z, x = state["z"], state["x"]
                step = torch.sign(p.grad, out=p.grad)  # in place: the gradient is not read after the step
                if p in self.lr_scales:
                    z.addcmul_(step, self.lr_scales[p], value=-lr)
                else:
                    z.add_(step, alpha=-lr)
                x.lerp_(z, weight)
                torch.lerp(z, x, beta, out=p)
        return None

    @torch.no_grad()
    def eval_params(self) -> None:
        """Put the averaged weights x into the parameters."""
        for group in self.param_groups:
            for p in group["params"]:
                if "x" in self.state[p]:
                    p.copy_(self.state[p]["x"])

    @torch.no_grad()
    def train_params(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if state:
                    torch.lerp(state["z"], state["x"], group["beta"], out=p)

    def copies(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The iterate z and average x of `param`, for constraints that must hold on them too."""
        state = self.state.get(param, {})
        return [state[key] for key in ("z", "x") if key in state]


def lr_multiplier(step: int, total: int, warmup: int, decay: str, decay_start: float) -> float:
    """Linear warm-up over `warmup` steps, then constant until `decay_start * total`, then decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    begin = int(decay_start * total)
    if decay == "constant" or step < begin or total <= begin:
        return 1.0
    progress = (step - begin) / (total - begin)
    if decay == "linear":
        return 1.0 - progress
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}; expected linear, cosine or constant")
