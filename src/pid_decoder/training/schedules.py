"""Learning-rate warm-up and the "power" EMA of the reference (training-details.md §5.2, §5.5).

The EMA coefficient is computed on the host from the Python iteration counter, and the update is two
``torch._foreach`` kernels per parameter group, so an EMA step never synchronises with the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


# --------------------------------------------------------------------------- learning rate
@dataclass(frozen=True)
class LambdaLinear:
    """The reference's one-cycle ``LambdaLinearScheduler`` as a ``LambdaLR`` factor ``f(n)``.

    ``n`` = scheduler steps taken (0 for the first optimizer step). Linear warm-up from ``f_start`` to
    ``f_max`` over ``warm_up`` steps, then linear from ``f_max`` to ``f_min`` at ``cycle_length``. The released
    recipes (the defaults) warm up over 2000 steps from 1e-6 and then hold 1.0. Beyond ``cycle_length`` the
    reference's schedule is undefined; here it holds ``f_min``. A dataclass, so ``LambdaLR.state_dict`` keeps it.
    """

    warm_up: int = 2000
    f_start: float = 1e-6
    f_max: float = 1.0
    f_min: float = 1.0
    cycle_length: int = 10_000_000

    def __post_init__(self) -> None:
        if self.warm_up < 0 or self.cycle_length <= self.warm_up:
            raise ValueError(
                f"LambdaLinear needs 0 <= warm_up < cycle_length, got warm_up={self.warm_up}, "
                f"cycle_length={self.cycle_length}"
            )

    def __call__(self, n: int) -> float:
        n = min(max(int(n), 0), self.cycle_length)
        if n < self.warm_up:
            return self.f_start + (self.f_max - self.f_start) * n / self.warm_up
        return self.f_min + (self.f_max - self.f_min) * (self.cycle_length - n) / (self.cycle_length - self.warm_up)


# --------------------------------------------------------------------------- power EMA
def ema_gamma(rate: float = 0.1) -> float:
    """Exponent of the power EMA: the largest real root of x^3 + 7x^2 + (16 - s^-2)x + (12 - s^-2), s = rate.

    rate 0.1 gives 6.937203937601809.
    """
    if not 0 < rate < 1:
        raise ValueError(f"EMA rate must be in (0, 1), got {rate}")
    k = rate**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_beta(iteration: int, gamma: float) -> float:
    """Decay ``(1 - 1/(it + 1))^(gamma + 1)``; 0 at ``it <= 0``, so the first update copies the network."""
    if iteration <= 0:
        return 0.0
    return (1.0 - 1.0 / (iteration + 1)) ** (gamma + 1)


@torch.no_grad()
def ema_update_(ema_params: list[torch.Tensor], params: list[torch.Tensor], beta: float) -> None:
    """In place: ``ema <- beta * ema + (1 - beta) * param`` for each pair (no host synchronisation)."""
    if len(ema_params) != len(params):
        raise ValueError(f"EMA has {len(ema_params)} tensors but the network has {len(params)}")
    if not ema_params:
        return
    torch._foreach_mul_(ema_params, beta)
    torch._foreach_add_(ema_params, params, alpha=1.0 - beta)


class EMA:
    """A float32 shadow copy of a network's named parameters (frozen ones too, as the reference).

    Built from ``named_parameters()`` (of the unwrapped network, after DDP/FSDP2 wrapping: the tensors may be
    DTensor shards; only ``torch._foreach`` ops touch them). ``update(iteration)`` after each optimizer step,
    with the iteration *before* it is incremented; ``state_dict()`` / ``load_state_dict()`` for checkpoints
    (keys = parameter names, no prefix); ``copy_to(module)`` writes the averages into a network with the same
    parameter names (e.g. before export); ``swapped()`` evaluates the tracked network with them temporarily.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], rate: float = 0.1) -> None:
        self.rate = rate
        self.gamma = ema_gamma(rate)
        self._params: dict[str, torch.Tensor] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        for name, p in named_params:
            self._params[name] = p
            self.shadow[name] = p.detach().clone().float()
        self._param_list = [p.detach() for p in self._params.values()]
        self._ema_list = list(self.shadow.values())

    @property
    def names(self) -> list[str]:
        return list(self.shadow)

    def update(self, iteration: int) -> float:
        """One EMA step with beta(iteration); returns the beta used."""
        beta = ema_beta(iteration, self.gamma)
        ema_update_(self._ema_list, self._param_list, beta)
        return beta

    def _targets(self, module: nn.Module) -> list[torch.Tensor]:
        params = dict(module.named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"module does not match the EMA: missing {missing[:5]}, unexpected {extra[:5]}")
        return [params[name].detach() for name in self.shadow]

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averages into ``module``'s parameters of the same names."""
        torch._foreach_copy_(self._targets(module), self._ema_list)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the tracked parameters hold the EMA; afterwards exactly their own values again."""
        with torch.no_grad():
            saved = [p.clone() for p in self._param_list]
            torch._foreach_copy_(self._param_list, self._ema_list)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._param_list, saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())
            extra = sorted(state.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, tensor in self.shadow.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"EMA state {name}: shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
            tensor.copy_(state[name])
