"""PiDNet: wiring only.

Legend: B batch, H/W output pixels, ps patch size, Hs/Ws = H/ps, W/ps patch grid, L = Hs*Ws patch tokens,
T text tokens, D hidden size, P = ps^2 pixels per patch, C pixel width, N = B*L.

``net(x, t, text, lq_latent, degrade_sigma)`` has the reference's semantics (velocity prediction, ``t``
on the 0-1000 scale). Samplers call `prepare` once per image (text embedding, LQ features and position
tables do not depend on the step) and `denoise` once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import NetConfig
from .attention import attention_kernels
from .layers import Linear, RMSNorm, TimestepEmbedder
from .lq_projection import LQProjection, SigmaGate
from .patch_block import PatchBlock
from .pixel_block import FinalLayer, PixelBlock, PixelEmbedder
from .positions import RopeTable, pixel_sincos, rope_1d, rope_2d


class PatchEmbedder(nn.Module):
    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.proj = Linear(in_features, hidden)


class TextEmbedder(nn.Module):
    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.proj = Linear(in_features, hidden)
        self.norm = RMSNorm(hidden)


@dataclass
class Conditioning:
    """Everything a denoising step needs that does not depend on the step."""

    height: int
    width: int
    text: torch.Tensor  # (B, T, D) embedded text tokens
    rope_patch: RopeTable
    rope_text: RopeTable | None
    rope_pixel: RopeTable
    pixel_pos: tuple[torch.Tensor, torch.Tensor]
    lq_feats: list[torch.Tensor] | None = None  # per injection point, (B, L, D)
    pit_feat: torch.Tensor | None = None  # (B, L, D)
    sigma: torch.Tensor | None = None  # (B,) float32
    # Lazy LQ features (tiled decode): the LQ trunk's tokens of the whole image and this window's token index;
    # the per-token heads then run at every evaluation, so only one window's features exist at a time.
    lq_source: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def batch(self) -> int:
        return self.text.shape[0]


@dataclass(frozen=True)
class Window:
    """A crop of a larger image, in pixels: the crop starts at (top, left) of a height x width image."""

    top: int
    left: int
    height: int
    width: int


def _rows(table: RopeTable, index: torch.Tensor | None) -> RopeTable:
    return table if index is None else table[index]


@dataclass(frozen=True)
class Crop:
    """A height x width region at (top, left) of the image being conditioned, in pixels."""

    top: int
    left: int
    height: int
    width: int


class PiDNet(nn.Module):
    """The PiD network (``config.lq`` set) or the text-to-image PixelDiT (``config.lq is None``).

    ``aux_head=True`` builds the training-only modules the config asks for (the v1.5 auxiliary LQ-RGB head,
    ``lq_proj.lq_aux_rgb_head``); `forward_train` evaluates them. Inference networks never have them.
    """

    def __init__(self, config: NetConfig, *, aux_head: bool = False) -> None:
        super().__init__()
        self.config = cfg = config
        self.preset = None  # the released preset the weights came from, when known
        D, ps, C = cfg.hidden_size, cfg.patch_size, cfg.pixel_hidden_size
        P = ps * ps
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.txt_max_length, D))
        self.pixel_embedder = PixelEmbedder(cfg.in_channels, C, ps)
        self.s_embedder = PatchEmbedder(cfg.in_channels * P, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = TextEmbedder(cfg.txt_embed_dim, D)
        self.patch_blocks = nn.ModuleList(
            PatchBlock(D, cfg.num_groups, last=i == cfg.patch_depth - 1) for i in range(cfg.patch_depth)
        )
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(D, C, cfg.pixel_attn_hidden_size, cfg.pixel_num_groups, P) for _ in range(cfg.pixel_depth)
        )
        self.final_layer = FinalLayer(C, cfg.in_channels)
        if cfg.lq is not None:
            self.lq_proj = LQProjection(cfg.lq, D, ps, cfg.num_lq_injections, aux_head=aux_head)
            per_dim = cfg.lq.gate_type == "sigma_aware_per_token_per_dim"
            self.pit_lq_gate = SigmaGate(D, per_dim) if cfg.lq.pit_inject else None
        else:
            self.lq_proj = None
            self.pit_lq_gate = None
        # Reproducible, cheap default values (a checkpoint normally replaces them all).
        self.apply(_init_defaults)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.s_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.s_embedder.proj.weight.device

    def output_size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Output pixel size for a latent grid (h, w)."""
        if self.config.lq is None:
            raise ValueError("PixelDiT has no latent input; pass height and width explicitly")
        k = self.config.lq.pixels_per_latent
        return latent_hw[0] * k, latent_hw[1] * k

    # ------------------------------------------------------------------ API
    def prepare(
        self,
        text: torch.Tensor,
        lq_latent: torch.Tensor | None,
        degrade_sigma: torch.Tensor | float | None,
        height: int,
        width: int,
        *,
        window: Window | None = None,
    ) -> Conditioning:
        """Validate the inputs and compute the step-independent conditioning.

        With ``window``, the conditioning is for the ``height x width`` crop at (window.top, window.left) of a
        ``window.height x window.width`` image: positions (RoPE, pixel sin-cos) and LQ features are those of the
        full image (``lq_latent`` is the full image's latent), so a windowed decode sees consistent positions.
        """
        if window is None:
            return self.prepare_windows(text, lq_latent, degrade_sigma, height, width, [None])[0]
        crop = Crop(window.top, window.left, height, width)
        return self.prepare_windows(text, lq_latent, degrade_sigma, window.height, window.width, [crop])[0]

    def prepare_windows(
        self,
        text: torch.Tensor,
        lq_latent: torch.Tensor | None,
        degrade_sigma: torch.Tensor | float | None,
        height: int,
        width: int,
        crops: list[Crop | None],
        lazy_lq: bool = False,
    ) -> list[Conditioning]:
        """Conditioning for several crops of one ``height x width`` image (None = the whole image).

        Each `Crop` is a region in pixels (multiples of the patch size). The text embedding and the LQ projection's
        convolutional trunk run once for all crops; only the per-token heads run per crop. With ``lazy_lq`` the
        heads are not evaluated here but at every `denoise` of that crop (from the shared trunk output), so the
        memory of the LQ features is one crop's, not all crops' together (the tiled decode's choice).
        """
        from .validation import check_inputs, check_window

        sigma = check_inputs(self.config, text, lq_latent, degrade_sigma, height, width)
        for crop in crops:
            if crop is not None:
                check_window(self.config, Window(crop.top, crop.left, height, width), crop.height, crop.width)
        return self._conditioning(text, lq_latent, sigma, height, width, crops, lazy_lq)

    def _conditioning(
        self,
        text: torch.Tensor,
        lq_latent: torch.Tensor | None,
        sigma: torch.Tensor | None,
        height: int,
        width: int,
        crops: list[Crop | None],
        lazy_lq: bool,
    ) -> list[Conditioning]:
        """`prepare_windows` on validated inputs (sigma a float32 (B,) tensor or None)."""
        cfg, dev = self.config, self.device
        ps = cfg.patch_size
        grid = (height // ps, width // ps)
        T = min(text.shape[1], cfg.txt_max_length)
        y = text[:, :T].to(device=dev, dtype=self.dtype)  # parity: text beyond txt_max_length is dropped
        y = self.y_embedder.norm(self.y_embedder.proj(y)) + self.y_pos_embedding[:, :T]  # (B, T, D)
        rope_patch = rope_2d(*grid, cfg.head_dim, cfg.rope_mode, cfg.rope_ref_grid, dev)
        rope_pixel = rope_2d(*grid, cfg.pixel_head_dim, cfg.rope_mode, cfg.rope_ref_grid, dev)
        rope_text = rope_1d(T, cfg.head_dim, cfg.text_rope_theta, dev) if cfg.use_text_rope else None
        col, row = pixel_sincos(height, width, cfg.pixel_hidden_size, dev, torch.float32)
        tokens = self.lq_proj.trunk(lq_latent.to(dev), grid) if self.lq_proj is not None else None  # (B, L, K)

        conds = []
        for crop in crops:
            if crop is None:
                crop, index = Crop(0, 0, height, width), None
            else:
                top, left = crop.top // ps, crop.left // ps
                rows = torch.arange(top, top + crop.height // ps)[:, None] * grid[1]
                index = (rows + torch.arange(left, left + crop.width // ps)[None]).flatten().to(dev)  # (h*w,)
            cond = Conditioning(
                height=crop.height,
                width=crop.width,
                text=y,
                rope_patch=_rows(rope_patch, index),
                rope_text=rope_text,
                rope_pixel=_rows(rope_pixel, index),
                pixel_pos=(col[crop.left: crop.left + crop.width], row[crop.top: crop.top + crop.height]),
            )
            if tokens is not None:
                if lazy_lq:
                    cond.lq_source = (tokens, index)
                else:
                    cond.lq_feats, cond.pit_feat = self.lq_proj.heads(tokens if index is None else tokens[:, index])
                cond.sigma = sigma.to(dev)
            conds.append(cond)
        return conds

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, chunk: int | None = None) -> torch.Tensor:
        """One network evaluation. x (B, 3, H, W), t (B,) on the 0-1000 scale -> velocity (B, 3, H, W) float32.

        ``chunk`` bounds the number of patch tokens the pixel pathway processes at once (None: all).
        """
        with attention_kernels(x.device):
            return self._denoise(x, t, cond, chunk)

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, chunk: int | None) -> torch.Tensor:
        cfg = self.config
        B, _, H, W = x.shape
        ps = cfg.patch_size
        Hs, Ws = H // ps, W // ps
        x = x.float()
        patches = F.unfold(x, ps, stride=ps).transpose(1, 2)  # (B, L, 3*P), feature = c*P + ky*ps + kx
        t_emb = self.t_embedder(t.expand(B))[:, None]  # (B, 1, D)
        c = F.silu(t_emb)
        s = self.s_embedder.proj(patches).float()  # (B, L, D), float32 residual stream
        y = cond.text
        interval = cfg.lq.interval if cfg.lq else 0
        lq_feats, pit_feat = cond.lq_feats, cond.pit_feat
        if lq_feats is None and cond.lq_source is not None:
            tokens, index = cond.lq_source
            lq_feats, pit_feat = self.lq_proj.heads(tokens if index is None else tokens[:, index])
        for i, block in enumerate(self.patch_blocks):
            if lq_feats is not None and i % interval == 0:
                s = self.lq_proj.gate_modules[i // interval](s, lq_feats[i // interval], cond.sigma)
            s, y = block(s, y, c, cond.rope_patch, cond.rope_text)
        s = F.silu(t_emb + s)  # (B, L, D)
        if self.pit_lq_gate is not None:
            # parity: the PiT gate is applied after the silu.
            s = self.pit_lq_gate(s, pit_feat, cond.sigma)
        s = s.flatten(0, 1)  # (N, D)
        p = self.pixel_embedder(x, cond.pixel_pos)  # (N, P, C)
        for block in self.pixel_blocks:
            p = block(p, s, cond.rope_pixel, B, chunk)
        out = self.final_layer(p)  # (N, P, 3)
        out = out.view(B, Hs, Ws, ps, ps, -1).permute(0, 5, 1, 3, 2, 4)  # (B, 3, Hs, ps, Ws, ps)
        return out.reshape(B, -1, H, W).float()  # (B, 3, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        lq_latent: torch.Tensor | None = None,
        degrade_sigma: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Velocity prediction ``v = noise - x0``. x (B, 3, H, W), t (B,) in [0, 1000], text (B, T, txt_dim)."""
        from .validation import check_x_t

        check_x_t(self.config, x, t, text.shape[0] if torch.is_tensor(text) else None)
        cond = self.prepare(text, lq_latent, degrade_sigma, x.shape[-2], x.shape[-1])
        return self.denoise(x.to(self.device), torch.as_tensor(t, dtype=torch.float32, device=self.device), cond)


    def forward_train(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        lq_latent: torch.Tensor | None = None,
        degrade_sigma: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training evaluation: (velocity (B, 3, H, W), aux LQ-RGB prediction (B, 3, H/4, W/4) or None).

        The same computation as `forward` (the LQ trunk runs once; its tokens feed both the per-token heads
        and the aux head, so both losses reach it), without `forward`'s value checks: they synchronise with
        the host, and the loss validates its inputs once. t (B,) float32 on the 0-1000 scale, degrade_sigma
        (B,) float32. The aux prediction is None when the network has no aux head.
        """
        B, _, H, W = x.shape
        sigma = None if degrade_sigma is None else degrade_sigma.to(device=x.device, dtype=torch.float32)
        cond = self._conditioning(text, lq_latent, sigma, H, W, [None], lazy_lq=True)[0]
        v = self.denoise(x, t, cond)  # (B, 3, H, W)
        if self.lq_proj is None or self.lq_proj.lq_aux_rgb_head is None:
            return v, None
        ps = self.config.patch_size
        return v, self.lq_proj.aux_rgb(cond.lq_source[0], (H // ps, W // ps))  # (B, 3, H/4, W/4)


def _init_defaults(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.device.type != "meta":
        fan_in = module.weight[0].numel()
        nn.init.normal_(module.weight, std=1 / math.sqrt(fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
