"""Exponential moving average of the adapter weights (kept in float32, on the weights' device)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = decay · shadow + (1 - decay) · weight`` after every optimizer step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average one step toward the module's current weights."""
        # One fused kernel launch per dtype/device group instead of one lerp per tensor: an adapter has
        # ~100 tensors, so the per-tensor loop cost more launch time than arithmetic on a GPU.
        weights = module.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [weights[k].float() for k in self.shadow], 1.0 - self.decay)

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into ``module``."""
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
