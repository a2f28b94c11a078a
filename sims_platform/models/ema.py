"""Power-function EMA (EDM2, section 3.1 of the post-hoc EMA paper): the averaging length grows with training."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Generic, TypeVar

import numpy as np
import torch
from torch import nn

NetT = TypeVar("NetT", bound=nn.Module)


def std_to_exp(std: float) -> float:
    """Exponent gamma whose power-function profile has relative std `std`.

    Solves std^2 = (gamma+1) / ((gamma+2)^2 (gamma+3)) for gamma (the largest real root).
    """
    tmp = std**-2
    roots = np.roots([1, 7, 16 - tmp, 12 - tmp])
    return float(roots[np.isreal(roots)].real.max())


def power_function_beta(std: float, t_next: float, t_delta: float) -> float:
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)


class PowerFunctionEMA(Generic[NetT]):
    """Keeps an EMA copy of a network; `update` after each optimizer step with images seen so far."""

    def __init__(self, net: NetT, std: float):
        self.std = std
        self.ema: NetT = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor], cur_images: int, batch_size: int) -> None:
        """Moves the copy towards params: the network's current parameters, in its parameters() order."""
        beta = power_function_beta(self.std, t_next=cur_images, t_delta=batch_size)
        for p_ema, p_net in zip(self.ema.parameters(), params):
            p_ema.lerp_(p_net.detach().to(p_ema.dtype), 1 - beta)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
