"""The DMD2 discriminator: heads on the frozen teacher's patch-block features, and the feature tap.

Legend: B batch, L = Hs*Ws patch tokens, D hidden size of the tapped net, Hs/Ws patch grid, c channels.

The tap reads block outputs from OUTSIDE the network (forward hooks on ``net.patch_blocks[i]``), so the
inference model has no GAN branches. The head is the reference's ``Discriminator_ImageDiT`` (spec
distillation.md §2.2): per tapped block, ``num_conv_layers - 1`` blocks [conv k4/s2/p1 -> GroupNorm -> LeakyReLU
0.2] halving the channels (floor 64 after the first), a 1x1 conv to one logit map, global mean -> (B, 1). The
heads' state-dict keys are the reference's (``cls_pred_heads.0.{0,1,3}.{weight,bias}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def optimal_groups(channels: int) -> int:
    """GroupNorm groups: ``max(1, C // 4)`` for C <= 32, else the largest divisor of C that is <= 32."""
    if channels <= 32:
        return max(1, channels // 4)
    groups = 32
    while groups > 1 and channels % groups:
        groups -= 1
    return groups


def _head(inner_dim: int, num_conv_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = inner_dim
    for i in range(num_conv_layers - 1):
        out = channels // 2 if i == 0 else max(channels // 2, 64)
        layers += [
            nn.Conv2d(channels, out, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(optimal_groups(out), out, eps=1e-5),
            nn.LeakyReLU(0.2),
        ]
        channels = out
    layers += [nn.Conv2d(channels, 1, kernel_size=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Logits ``(B, n_heads)`` from tapped teacher features (one head per tapped block, in index order).

    ``feature_indices`` at or beyond ``num_blocks`` are discarded (as in the reference); ``indices`` lists the
    ones kept, sorted, and is what `FeatureTap` must collect.
    """

    def __init__(
        self, inner_dim: int, feature_indices: Iterable[int] = (7,), num_blocks: int = 14, num_conv_layers: int = 2
    ) -> None:
        super().__init__()
        if num_conv_layers < 1:
            raise ValueError(f"num_conv_layers must be >= 1, got {num_conv_layers}")
        if inner_dim < 2:
            raise ValueError(f"inner_dim must be >= 2, got {inner_dim}")
        self.indices = tuple(sorted(i for i in set(feature_indices) if 0 <= i < num_blocks))
        if not self.indices:
            raise ValueError(
                f"no usable feature index in {sorted(set(feature_indices))}: indices must lie in [0, {num_blocks})"
            )
        self.inner_dim = inner_dim
        self.cls_pred_heads = nn.ModuleList(_head(inner_dim, num_conv_layers) for _ in self.indices)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: one (B, D, Hs, Ws) map per index in ``self.indices`` -> logits (B, n_heads)."""
        if len(features) != len(self.cls_pred_heads):
            raise ValueError(f"expected {len(self.indices)} feature maps (blocks {self.indices}), got {len(features)}")
        for f in features:
            if f.ndim != 4 or f.shape[1] != self.inner_dim or min(f.shape[-2:]) < 2:
                raise ValueError(
                    f"discriminator features must be (B, {self.inner_dim}, Hs>=2, Ws>=2), got {tuple(f.shape)}: "
                    "the head's stride-2 conv needs a patch grid of at least 2x2 (images >= 2 patches per side)"
                )
        return torch.cat([head(f) for head, f in zip(self.cls_pred_heads, features)], dim=1)  # (B, n_heads)


class _StopForward(Exception):
    """Raised by the tap after the last wanted block when the rest of the net is not needed."""


class FeatureTap:
    """Collects the image-token stream after the patch blocks ``indices`` of ``net`` via forward hooks.

    The hooks record only inside `capture`, so activation-checkpoint recomputation (in backward) records
    nothing. Blocks wrapped from outside (checkpoint / FSDP wrappers) keep working: the hook sits on whatever
    module ``net.patch_blocks[i]`` is.
    """

    def __init__(self, net: nn.Module, indices: Sequence[int]) -> None:
        blocks = net.patch_blocks
        if max(indices) >= len(blocks):
            raise ValueError(f"feature indices {tuple(indices)} exceed the net's {len(blocks)} patch blocks")
        self.indices = tuple(indices)
        self._active = False
        self._early = False
        self._out: list[torch.Tensor] = []
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in self.indices]

    def _hook(self, index: int):
        def hook(module, args, output):
            if not self._active:
                return
            self._out.append(output[0])  # image tokens (B, L, D); output[1] is the text stream
            if self._early and index == self.indices[-1]:
                raise _StopForward
            return

        return hook

    @contextmanager
    def capture(self, early: bool = False):
        """Record during the block; with ``early`` the net's forward stops after the last tapped block."""
        self._active, self._early, self._out = True, early, []
        try:
            yield self._out
        finally:
            self._active, self._early = False, False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, D) row-major patch tokens -> (B, D, Hs, Ws)."""
    B, L, D = tokens.shape
    Hs, Ws = grid
    if L != Hs * Ws:
        raise ValueError(f"feature tokens ({L}) do not match the patch grid {Hs}x{Ws}")
    return tokens.view(B, Hs, Ws, D).permute(0, 3, 1, 2)  # (B, D, Hs, Ws)


class TeacherWithFeatures:
    """The frozen teacher as the distillation losses call it.

    - ``teacher.forward_train(x, t, text, lq, sigma)`` -> (velocity (B, 3, H, W), None)
    - ``teacher.with_features(...)`` -> (velocity, [feature maps]), the full forward (student step: the graph
      to ``x`` is kept when grad mode is on)
    - ``teacher.features(...)`` -> [feature maps], stopping after the last tapped block (critic step)

    ``t`` is on the net's 0-1000 scale. Feature maps are (B, D, H/ps, W/ps), one per tapped block.
    """

    def __init__(self, net: nn.Module, indices: Sequence[int], patch_size: int | None = None) -> None:
        self.net = net
        self.tap = FeatureTap(net, indices)
        self.patch_size = patch_size if patch_size is not None else net.config.patch_size

    def forward_train(self, x, t, text, lq_latent, degrade_sigma) -> tuple[torch.Tensor, None]:
        return self.net.forward_train(x, t, text, lq_latent, degrade_sigma)[0], None

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def with_features(self, x, t, text, lq_latent, degrade_sigma) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with self.tap.capture() as out:
            v = self.net.forward_train(x, t, text, lq_latent, degrade_sigma)[0]
        return v, [tokens_to_map(f, self._grid(x)) for f in out]

    def features(self, x, t, text, lq_latent, degrade_sigma) -> list[torch.Tensor]:
        with self.tap.capture(early=True) as out:
            try:
                self.net.forward_train(x, t, text, lq_latent, degrade_sigma)
            except _StopForward:
                pass
        return [tokens_to_map(f, self._grid(x)) for f in out]
