"""The stage-0/1 training loop (training-details.md §0, §5), readable top to bottom in `train`.

    cfg = load_config("configs/train/tiny-cpu.toml")
    result = train(cfg)                                   # or: pid-decoder train CONFIG [--set k=v] [--resume]

One step: batch -> LQ condition (backbone encode, noising, dropout) -> text -> t, noise -> `teacher_losses`
under bf16 autocast over float32 weights -> backward (/ grad_accum) -> nan->0, clip -> fused AdamW (skipped
on a non-finite norm) -> warm-up LR -> power EMA -> metrics. The only host syncs are at logging intervals.
Every draw of a sample comes from a generator seeded by (run.seed, the sample's global index), so a resumed
run's next step equals the uninterrupted run's, and N ranks compute what one process computes with the same
global batch (the reference seeds per rank instead and is not reproducible, spec Q16).

Reusable pieces (the distillation loop uses them): `build_optimizer`, `build_scheduler`, `optimizer_step`,
`StopSignal`, `prepare_run` / `RunContext`, `build_backbone`, `text_source`, `init_network`,
`PixelsBackbone`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, BackboneInfo
from .checkpoint import CheckpointError, CheckpointManager, ModelState, OptimizerState, RNGState
from .config import ConfigError, OptimConfig, TrainConfig, format_config
from .distributed import (
    DistInfo,
    any_rank,
    choose_mode,
    full_tensor,
    init_distributed,
    mean_over_ranks,
    unwrap,
    wrap_model,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- optimisation pieces
def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` (one group: weight decay on every tensor, parity Q4), fused where the device has it."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.trainable")
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.fused and device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError) as err:  # no fused kernel for this device/dtype
            logger.info("fused AdamW unavailable (%s); using the foreach implementation", err)
    return torch.optim.AdamW(params, foreach=True, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The reference's warm-up: LR factor from ``warmup_start`` to 1 over ``warmup_steps`` optimizer steps, then 1."""
    from .schedules import LambdaLinear

    schedule = LambdaLinear(warm_up=cfg.warmup_steps, f_start=cfg.warmup_start, f_max=1.0, f_min=1.0,
                            cycle_length=max(10_000_000, cfg.warmup_steps + 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def optimizer_step(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    max_norm: float,
) -> torch.Tensor:
    """Clip and step at an accumulation boundary; returns the pre-clip gradient norm (a device tensor).

    Order (§5.3-§5.4): NaN/inf gradients -> 0; global L2 norm; scale by min(1, max_norm / (norm + 1e-6));
    AdamW step unless the norm is non-finite (then nothing changes: no update, no weight decay, no step count);
    scheduler step; zero grads. The skip decision stays on the device for the fused AdamW (its ``found_inf``
    input); the foreach fallback reads the norm on the host.
    """
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
    norm = full_tensor(torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)) if grads else None
    if norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        finite = torch.isfinite(norm)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = (~finite).float()
            optimizer.step()
            optimizer.found_inf = None
        elif bool(finite):  # host sync: only without the fused kernel
            optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm if norm is not None else torch.zeros(())


class StopSignal:
    """SIGTERM / SIGINT set a flag instead of killing the process; the loop saves at the next step boundary.

    A second signal of the same kind restores the default behaviour (a second Ctrl-C interrupts at once).
    Use as a context manager around the loop; `requested(info)` agrees over all ranks (a host-side gloo
    all-reduce, no GPU sync). ``stop.request()`` triggers it programmatically (tests, callbacks).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.flag = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def request(self, signum: int | None = None) -> None:
        self.flag = True
        self.received = signum

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == self.received:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        self.request(signum)
        logger.warning("received %s: saving a checkpoint at the next step boundary, then stopping",
                       signal.Signals(signum).name)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self, info: DistInfo) -> bool:
        return any_rank(self.flag, info)


# --------------------------------------------------------------------------- a tiny latent space for tests
class PixelsBackbone(Backbone):
    """A weight-free latent space for tiny runs and tests: ``pixel_unshuffle`` by 2 (12 channels, 1/2 size).

    Decoding is the exact inverse (``pixel_shuffle``), so the validation grid's "backbone decode" column shows
    the LQ image itself. Flow noise frame.
    """

    info = BackboneInfo("pixels", 12, 2, "flow", None, "", "no weights (built in)")
    image_multiple = 2

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, 2)  # (B, 12, H/2, W/2)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, 2)  # (B, 3, 2h, 2w)

    def check_latent(self, latent: torch.Tensor) -> None:
        if latent.ndim != 4 or latent.shape[1] != 12:
            raise ValueError(f"pixels latent must be (B, 12, h, w), got {tuple(latent.shape)}")


def backbone_facts(name: str) -> tuple[int, int, str]:
    """(latent channels, down factor, noise frame) of a backbone name, without loading it."""
    if name == "pixels":
        info = PixelsBackbone.info
    else:
        from ..backbones import BACKBONE_INFO, resolve_backbone_name

        info = BACKBONE_INFO[resolve_backbone_name(name)]
    return info.latent_channels, info.down_factor, info.noise_frame


def build_backbone(name: str, path: str, device: torch.device) -> Backbone:
    """The frozen backbone of the LQ condition (bf16 weights on CUDA, as the reference encodes)."""
    if name == "pixels":
        return PixelsBackbone(device=device)
    from ..backbones import load_backbone

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_backbone(name, path or None, device=device, dtype=dtype)


# --------------------------------------------------------------------------- network
LQ_PREFIXES = ("lq_proj.", "pit_lq_gate.")


@torch.no_grad()
def init_lq_weights(net: nn.Module, generator: torch.Generator | None = None) -> None:
    """The reference's fresh LQ-branch initialisation (training-details.md §4.3).

    Convs: weight ~ N(0, 0.02) truncated at +-2, bias 0; norms weight 1, bias 0; the 7 output heads and the PiT
    head zero (the LQ injection starts at exactly 0); the aux head Linears N(0, 0.02), bias 0; gates:
    content_proj N(0, 0.01), bias 2.0, log_alpha ln 5.
    """
    lq = getattr(net, "lq_proj", None)
    if lq is None:
        return

    def trunc(w: torch.Tensor, std: float) -> None:  # drawn on the host: the same values on every device
        w.copy_(torch.randn(w.shape, generator=generator).mul_(std).clamp_(-2.0, 2.0))

    for module in lq.latent_proj.modules():
        if isinstance(module, nn.Conv2d):
            trunc(module.weight, 0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.GroupNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    heads = list(lq.output_heads) + ([lq.pit_head] if lq.pit_head is not None else [])
    for head in heads:
        head.weight.zero_()
        head.bias.zero_()
    if getattr(lq, "lq_aux_rgb_head", None) is not None:
        for module in lq.lq_aux_rgb_head:
            if isinstance(module, nn.Linear):
                trunc(module.weight, 0.02)
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
    gates = list(lq.gate_modules) + ([net.pit_lq_gate] if getattr(net, "pit_lq_gate", None) is not None else [])
    for gate in gates:
        trunc(gate.content_proj.weight, 0.01)
        gate.content_proj.bias.fill_(2.0)
        gate.log_alpha.fill_(math.log(5.0))


@torch.no_grad()
def init_scratch_weights(net: nn.Module) -> None:
    """DiT-style start for a network trained from scratch (no ``model.init``): every adaLN modulation and the final
    pixel projection are zero, so each block starts as the identity and the output starts at 0. The released
    runs never train from scratch (they start from PixelDiT weights); tiny test networks learn much faster so."""
    for name, module in net.named_modules():
        if "adaLN_modulation" in name and isinstance(module, nn.Linear):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    final = getattr(getattr(net, "final_layer", None), "linear", None)
    if final is not None:
        final.weight.zero_()
        if final.bias is not None:
            final.bias.zero_()


def init_network(cfg: TrainConfig, device: torch.device, generator: torch.Generator | None = None) -> nn.Module:
    """The float32 training network: the config's architecture (aux head as configured), weights from
    ``model.init`` (a full file, or a PixelDiT file whose missing LQ branch gets `init_lq_weights`), or from
    scratch (`init_scratch_weights`, `init_lq_weights`)."""
    from ..checkpoints import network_keys, open_checkpoint
    from ..keys import key_problems
    from ..model.net import PiDNet

    net_config = cfg.net_config
    aux = net_config.lq is not None and net_config.lq.aux_rgb_head
    # Built on the training device: no full host copy per rank (the file's tensors are copied in place below).
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        net = PiDNet(net_config, aux_head=aux)
    init_lq_weights(net, generator)
    if not cfg.model.init:
        init_scratch_weights(net)
    else:
        ckpt = open_checkpoint(cfg.model.init)
        mapping, _ = network_keys(ckpt, training=True)
        expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        found = {name: ckpt.shapes[key] for name, key in mapping.items()}
        missing = [k for k in expected if k not in found]
        lq_only = missing and all(k.startswith(LQ_PREFIXES) for k in missing)
        problems = key_problems({k: v for k, v in expected.items() if k in found or not lq_only}, found)
        if problems:
            raise ValueError(f"model.init {cfg.model.init} does not fit the configured network: " + "; ".join(problems))
        state = {name: ckpt.tensor(key) for name, key in mapping.items()}  # file tensors (mmap where possible)
        net.load_state_dict(state, strict=not lq_only)  # copied into the float32 parameters one by one
        if lq_only:
            logger.info("model.init has no LQ branch (%d keys): it starts from the reference's fresh init", len(missing))
    for module in net.modules():
        if hasattr(module, "restore_float32"):
            module.restore_float32()
    net = net.to(device=device, dtype=torch.float32)
    return net.train()


# --------------------------------------------------------------------------- text
class TextSource:
    """Text embeddings of a batch: per-sample files (with the empty-caption embedding for dropped captions),
    Gemma through `TextEncoder` (with its disk cache), or an all-zero embedding ("zeros", no captions)."""

    def __init__(self, mode: str, net_config, *, empty: torch.Tensor | None = None, encoder: str = "",
                 device: torch.device | None = None) -> None:
        self.mode, self.empty, self.device = mode, empty, device or torch.device("cpu")
        self.dim, self.length = net_config.txt_embed_dim, net_config.txt_max_length
        self.encoder = None
        if mode == "encoder":
            from ..text import DEFAULT_TEXT_ENCODER, TextEncoder

            self.encoder = TextEncoder(encoder or DEFAULT_TEXT_ENCODER, device=self.device)

    def __call__(self, batch: dict, drop: torch.Tensor) -> torch.Tensor:
        """(B, T, D) float32 on the device for the batch, captions in ``drop`` (B,) bool replaced by ""."""
        from .conditioning import apply_caption_dropout

        b = batch["hq"].shape[0]
        if self.mode == "zeros":
            return torch.zeros(b, self.length, self.dim, device=self.device)
        if self.mode == "embeddings":
            _, text = apply_caption_dropout(batch["caption"], drop, batch["text"], self.empty)
            return text.to(self.device, non_blocking=True)
        captions, _ = apply_caption_dropout(batch["caption"], drop)
        return self.encoder.encode(captions).to(self.device, non_blocking=True)

    def negative(self, text: torch.Tensor) -> torch.Tensor:
        """The CFG negative for validation: the reference's negative prompt (encoder), else the empty caption's
        embedding (pre-pass files), else zeros; shaped like ``text`` (B, T, D)."""
        if self.mode == "encoder":
            neg = self.encoder.encode_negative(text.shape[0]).to(self.device)
        elif self.mode == "embeddings":
            neg = self.empty.to(self.device)[None].expand(text.shape[0], -1, -1)
        else:
            return torch.zeros_like(text)
        return neg

    def fixed(self, captions: list[str], texts: torch.Tensor | None) -> torch.Tensor:
        """Embeddings of fixed captions (validation), without dropout."""
        drop = torch.zeros(len(captions), dtype=torch.bool)
        batch = {"hq": torch.empty(len(captions), 0), "caption": captions}
        if texts is not None:
            batch["text"] = texts
        return self(batch, drop)


# --------------------------------------------------------------------------- run setup
@dataclass
class RunContext:
    """Everything `train` builds before the first step (also what distillation reuses)."""

    cfg: TrainConfig
    info: DistInfo
    run_dir: Path
    mode: str
    manager: CheckpointManager
    resume_from: Path | None
    loader: Any = None
    backbone: Any = None
    conditioner: Any = None
    text: TextSource | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _bucket_table(name: str):
    from .buckets import get_bucket_table, single_resolution_table

    if name.startswith("square-"):
        try:
            side = int(name.removeprefix("square-"))
        except ValueError:
            side = 0
        if side < 16 or side % 16:
            raise ConfigError(f"data.buckets {name!r}: square-N needs N a positive multiple of 16")
        return single_resolution_table({(1, 1): (side, side)}, ratios=((1, 1),), rescue=None, name=name)
    try:
        return get_bucket_table(name)
    except ValueError as err:
        raise ConfigError(f"data.buckets: {err}, or square-N") from None


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove it is writable (one clear error otherwise)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{what} {folder} is not writable ({err.strerror or err}); choose another folder") from None


def validate_config(cfg: TrainConfig) -> None:
    """Cross-section checks that need no files: stage vs network, backbone vs LQ branch, batch vs accumulation."""
    net = cfg.net_config
    if cfg.run.stage == "teacher" and net.lq is None:
        raise ConfigError("run.stage = \"teacher\" needs a network with an LQ branch; this one is the PixelDiT "
                          "text-to-image net (use run.stage = \"pixeldit\")")
    if cfg.run.stage == "pixeldit" and net.lq is not None:
        raise ConfigError("run.stage = \"pixeldit\" trains the text-to-image PixelDiT; this network has an LQ branch "
                          "(use run.stage = \"teacher\", or model.preset = \"pixeldit-4k\")")
    if cfg.run.stage == "pixeldit" and cfg.model.trainable != "full":
        raise ConfigError("run.stage = \"pixeldit\" has no LQ branch to train alone: set model.trainable = \"full\"")
    if net.lq is not None:
        try:
            channels, down, _ = backbone_facts(cfg.conditioning.backbone)
        except ValueError as err:
            raise ConfigError(f"conditioning.backbone: {err} (or \"pixels\" for tiny test runs)") from None
        if (channels, down) != (net.lq.latent_channels, net.lq.latent_down_factor):
            raise ConfigError(
                f"conditioning.backbone {cfg.conditioning.backbone!r} gives {channels}-channel latents at 1/{down} of "
                f"the pixels, but the network's LQ branch expects {net.lq.latent_channels} channels at "
                f"1/{net.lq.latent_down_factor} (model.net.lq.latent_channels, latent_down_factor). Pick the backbone "
                "the network was built for, or change the network config."
            )
        if net.lq.sr_scale != 4:
            raise ConfigError(f"the training LQ is the HQ image / 4, but the network has lq.sr_scale={net.lq.sr_scale}")
    if cfg.model.init and not Path(cfg.model.init).is_file():
        raise ConfigError(
            f"model.init file not found: {cfg.model.init}. The released recipes start from the release's "
            "checkpoints/PixelDiT_finetune_2kto4k/model_ema_bf16.pth (download it, or set model.init to its path; "
            "model.init = \"\" trains from scratch)"
        )


def prepare_run(cfg: TrainConfig, *, resume: str | bool | None = None, info: DistInfo | None = None) -> RunContext:
    """Check every input and set up the run directory, before any model is built.

    Fails with one message for: an unwritable run directory, a resume from another config (or without a
    checkpoint), a missing or empty dataset, a backbone that does not fit the network.
    """
    validate_config(cfg)
    info = info or init_distributed(cfg.run.device)
    mode = choose_mode(cfg.run.parallel, info)
    run_dir = Path(cfg.run.dir)
    check_writable(run_dir, "run.dir")  # every rank checks (a shared filesystem), so every rank fails alike
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep_last, info=info, config=cfg.to_dict())
    resume_from = manager.resolve(resume)
    if resume is not None and resume is not False and resume_from is None:
        if str(resume) not in ("latest", "True"):
            raise CheckpointError(f"--resume {resume}: no checkpoint found")
        logger.info("no checkpoint in %s yet: starting from step 0", run_dir)
    if resume_from is not None:
        manager.check_config(resume_from)
    elif manager.latest() is not None:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints ({manager.latest().name}); pass --resume to continue that run "
            "or choose a new run.dir"
        )
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to an image folder or WebDataset shards")
    return RunContext(cfg, info, run_dir, mode, manager, resume_from)


def build_data(ctx: RunContext):
    """The rank's `BucketLoader` (T2's data pipeline) for the configured dataset and buckets."""
    from .data import build_loader

    cfg = ctx.cfg
    index_cache = cfg.data.index_cache or str(ctx.run_dir / "data_index.json")
    embeddings: str | None
    if cfg.data.text == "encoder" or cfg.data.text == "zeros":
        embeddings = None
    else:
        embeddings = cfg.data.embeddings or "auto"
    try:
        loader = build_loader(
            cfg.data.path, buckets=_bucket_table(cfg.data.buckets), batch_size=cfg.data.batch_size,
            seed=cfg.run.seed, rank=ctx.info.rank, world_size=ctx.info.world, num_workers=cfg.data.num_workers,
            kind=cfg.data.kind, embeddings=embeddings, index_cache=index_cache,
            pin_memory=ctx.info.device.type == "cuda",
        )
    except FileNotFoundError as err:
        raise ConfigError(f"data.path: {err}") from None
    if cfg.data.text == "embeddings" and loader.empty_text is None:
        raise ConfigError(f"data.text = \"embeddings\" but {cfg.data.path} has no embedding folder; run "
                          "`pid-decoder embed --dataset` first or set data.embeddings")
    return loader


# --------------------------------------------------------------------------- per-sample randomness
# Every random draw of a training sample comes from a generator seeded by (run seed, the sample's global index,
# stream). So a sample sees the same t, noise, LQ noising and dropout whatever the number of ranks, the batch
# split or a resume: one process with global batch G and N ranks with G / N each compute the same step.
STREAM_CONDITION, STREAM_STEP = 1, 2


def sample_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for sample ``index`` of stream ``stream`` of a run seeded with ``seed`` (splitmix64 mix)."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def draw_condition(conditioner, hq: torch.Tensor, seeds: list[int], generator: torch.Generator):
    """`LQConditioner` semantics with one generator per sample (reseeded from ``seeds``): downsample, encode the
    batch once, then per sample: noise apply, sigma, latent noise, caption dropout, LQ dropout (spec §2)."""
    from .conditioning import LQCondition, latent_noise
    from .degrade import downsample_lq

    lq_image = downsample_lq(hq)  # (B, 3, H/4, W/4)
    z = encode_lq(conditioner, lq_image)  # (B, C, h, w)
    draws = []
    for seed in seeds:
        generator.manual_seed(seed)
        u = torch.rand(5, generator=generator)  # apply, sigma, caption drop, LQ drop, spare
        eps = torch.randn(z.shape[1:], generator=generator)  # (C, h, w)
        draws.append((u, eps))
    u = torch.stack([d[0] for d in draws])  # (B, 5)
    apply = u[:, 0] < conditioner.noise_prob
    sigma = conditioner.sigma_min + (conditioner.sigma_max - conditioner.sigma_min) * u[:, 1]
    eps = torch.stack([d[1] for d in draws]).to(z.device, non_blocking=True)  # (B, C, h, w)
    z, degrade_sigma = latent_noise(z, apply=apply, sigma=sigma, eps=eps, frame=conditioner.frame)
    caption_drop = u[:, 2] < conditioner.caption_dropout
    lq_drop = (u[:, 3] < conditioner.lq_dropout).to(z.device)
    z = z * (~lq_drop).view(-1, 1, 1, 1).to(z.dtype)  # (B, C, h, w); a dropped LQ is all zeros
    lq_keep = (z != 0).flatten(1).any(dim=1)  # (B,), derived from the tensor as the reference does
    return LQCondition(lq_image, z, degrade_sigma, lq_keep, caption_drop, None)


@torch.no_grad()
def encode_lq(conditioner, lq_image: torch.Tensor) -> torch.Tensor:
    """``conditioner.encode`` without `Backbone.encode`'s input checks: their NaN test reads a device value on the
    host every step, and the LQ image is ours (a clamped downsample of a checked bucket size)."""
    backbone = conditioner.backbone
    if not isinstance(backbone, Backbone):
        return conditioner.encode(lq_image)
    z = backbone._encode(lq_image.to(backbone.device, torch.float32)).float()  # (B, C, h, w)
    return z.to(torch.bfloat16).float() if conditioner.round_bf16 else z  # parity: bf16 encoder output (§2.2)


def draw_time_noise(shape: tuple[int, ...], seeds: list[int], generator: torch.Generator, device: torch.device):
    """Per sample: t = sigmoid(N(0, 1)) (before the shift), then the image noise (B, 3, H, W), on ``device``."""
    from .losses import logit_normal

    ts, noises = [], []
    for seed in seeds:
        generator.manual_seed(seed)
        ts.append(logit_normal(1, generator, device))
        noises.append(torch.randn(shape, generator=generator, device=device))
    return torch.cat(ts), torch.stack(noises)


# --------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    step: int
    stopped: bool  # True when a signal ended the run early
    checkpoint: Path | None
    metrics: dict[str, float]


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.run.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    cfg: TrainConfig,
    *,
    resume: str | bool | None = None,
    info: DistInfo | None = None,
    stop: StopSignal | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Run (or continue) a training run; returns where it stopped.

    Args:
        resume: None / False (a fresh run; refuses a run dir that has checkpoints), True or "latest" (the newest
            checkpoint of ``run.dir``, or a fresh start if there is none), or a checkpoint / run directory path.
        info: an already initialised `DistInfo` (default: `init_distributed`).
        stop: a `StopSignal` (default: a new one, installed for SIGTERM/SIGINT during the loop).
        on_step: called as ``on_step(step, metrics)`` after every optimizer step (metrics: device tensors).
    """
    from .conditioning import LQConditioner
    from .logging import RunLogger
    from .losses import LossWeights, teacher_losses
    from .params import set_trainable
    from .schedules import EMA

    # ---- 1. inputs checked and the run directory prepared: no model exists yet
    ctx = prepare_run(cfg, resume=resume, info=info)
    info, device = ctx.info, ctx.info.device
    if info.is_main:
        logger.info("training config:\n%s", format_config(cfg))
        from ..checkpoints import atomic_write

        atomic_write(ctx.run_dir / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json()))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
        torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    loader = ctx.loader = build_data(ctx)
    net_config = cfg.net_config
    teacher = cfg.run.stage == "teacher"
    text_mode = cfg.data.text if cfg.data.text != "auto" else ("embeddings" if loader.empty_text is not None else "encoder")
    if teacher:
        ctx.backbone = build_backbone(cfg.conditioning.backbone, cfg.conditioning.backbone_path, device)
        ctx.conditioner = LQConditioner(
            ctx.backbone, net_config, noise_prob=cfg.conditioning.noise_prob, sigma_max=cfg.conditioning.sigma_max,
            caption_dropout=cfg.conditioning.caption_dropout, lq_dropout=cfg.conditioning.lq_dropout,
        )
    ctx.text = TextSource(text_mode, net_config, empty=loader.empty_text, encoder=cfg.data.text_encoder, device=device)

    # ---- 2. generators, network, wrapping, optimizer, schedule, EMA
    torch.manual_seed(cfg.run.seed + info.rank)  # the global RNGs (the loop's own draws use per-sample seeds)
    gen_cond = torch.Generator("cpu")  # LQ noising and dropout draws (small, on the host), reseeded per sample
    gen_step = torch.Generator(device)  # t and the image noise, on the device, reseeded per sample
    net = init_network(cfg, device, torch.Generator("cpu").manual_seed(cfg.run.seed))
    trainable = set_trainable(net, cfg.model.trainable)
    logger.info("%d trainable tensors (%.1f M of %.1f M parameters), mode %s, parallel %s", len(trainable),
                sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6,
                sum(p.numel() for p in net.parameters()) / 1e6, cfg.model.trainable, ctx.mode)
    model = wrap_model(net, ctx.mode, checkpointing=cfg.model.activation_checkpointing, info=info)
    net = unwrap(model)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim)
    ema = EMA(net.named_parameters(), cfg.ema.rate)
    progress = {"step": 0}
    state = {
        "net": ModelState(model), "net_ema": ema, "optim": OptimizerState(model, optimizer), "scheduler": scheduler,
        "data": loader, "rng": RNGState({"cond": gen_cond, "step": gen_step}, info.rank), "trainer": progress,
    }
    if ctx.resume_from is not None:
        progress["step"] = ctx.manager.load(ctx.resume_from, state)
    step = start = int(progress["step"])

    # ---- 3. the loop
    weights = LossWeights(
        diffusion=cfg.loss.diffusion_weight, lq_align=cfg.loss.lq_align_weight, y_weight=cfg.loss.lq_align_y_weight,
        chroma_weight=cfg.loss.lq_align_chroma_weight, eps=cfg.loss.lq_align_eps,
        sigma_power=cfg.loss.lq_align_sigma_power,
    )
    accum = cfg.optim.grad_accum
    global_batch = cfg.data.batch_size * info.world
    stop = stop or StopSignal()
    validator = Validator(ctx, model, ema, cfg) if cfg.validation.every else None
    log = RunLogger(ctx.run_dir, cfg.run.max_steps, start, info=info, tensorboard=cfg.log.tensorboard,
                    progress=cfg.log.progress)
    sums = torch.zeros(3, device=device)  # total, diffusion, lq_align since the last log line
    since = 0  # steps in `sums`
    last_saved = start if ctx.resume_from is not None else None
    record: dict[str, float] = {}
    batches = iter(loader)
    stopped = False
    model.train()
    with stop:
        while step < cfg.run.max_steps:
            images = 0
            for micro in range(accum):
                batch = next(batches)
                hq = batch["hq"].to(device, non_blocking=True)  # (B, 3, H, W)
                b, _, height, width = hq.shape
                first = (step * accum + micro) * global_batch + info.rank * cfg.data.batch_size
                indices = range(first, first + b)
                cond_seeds = [sample_seed(cfg.run.seed, i, STREAM_CONDITION) for i in indices]
                if teacher:
                    cond = draw_condition(ctx.conditioner, hq, cond_seeds, gen_cond)
                    lq_latent, sigma, lq_image, keep = cond.lq_latent, cond.degrade_sigma, cond.lq_image, cond.lq_keep
                    drop = cond.caption_drop
                else:
                    lq_latent = sigma = lq_image = keep = None
                    drop = torch.tensor([torch.rand(1, generator=gen_cond.manual_seed(sd)).item()
                                         < cfg.conditioning.caption_dropout for sd in cond_seeds])
                text = ctx.text(batch, drop)  # (B, T, D)
                step_seeds = [sample_seed(cfg.run.seed, i, STREAM_STEP) for i in indices]
                t, noise = draw_time_noise(tuple(hq.shape[1:]), step_seeds, gen_step, device)  # (B,), (B, 3, H, W)
                shift = _shift(cfg, height, width)
                with _autocast(cfg, device):
                    losses = teacher_losses(
                        model, hq, lq_latent, text, sigma, t=t, noise=noise, shift=shift, lq_image=lq_image,
                        lq_keep=keep, weights=weights, validate=step == start and micro == 0,
                    )
                (losses["total"] / accum).backward()
                sums += torch.stack([losses["total"].detach(), losses["diffusion"].detach(),
                                     losses.get("lq_align", torch.zeros((), device=device)).detach()]) / accum
                images += b * info.world
            grad_norm = optimizer_step(params, optimizer, scheduler, cfg.optim.grad_clip)
            ema.update(step)  # beta from the iteration before the increment (§5.5)
            step += 1
            since += 1
            log.step(step, images)
            if on_step is not None:
                on_step(step, {"loss": losses["total"].detach(), "grad_norm": grad_norm})
            if step % cfg.log.every == 0 or step == cfg.run.max_steps:
                avg = (mean_over_ranks(sums, info) / since).tolist()  # the loop's host sync
                record = log.metrics(step, {
                    "loss": avg[0], "diffusion": avg[1], **({"lq_align": avg[2]} if teacher else {}),
                    "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                    **{f"data_{k}": v for k, v in loader.counters.items() if k not in ("indexed", "usable")},
                })
                sums.zero_()
                since = 0
            if validator is not None and step % cfg.validation.every == 0:
                path = validator.run(step)
                if path is not None:
                    log.image("validation", step, path)
            if stop.requested(info):
                stopped = True
                break
            if step % cfg.checkpoint.every == 0:
                progress["step"] = step
                ctx.manager.save(step, state)
                last_saved = step
    # ---- 4. final checkpoint (also after a stop signal)
    progress["step"] = step
    checkpoint = ctx.manager.latest()
    if last_saved != step:
        checkpoint = ctx.manager.save(step, state)
    if stopped:
        log.message(f"stopped at step {step}; resume with --resume")
    log.close()
    return TrainResult(step, stopped, checkpoint, record)


def _shift(cfg: TrainConfig, height: int, width: int) -> float:
    if cfg.loss.shift == "static":
        return cfg.loss.static_shift
    from ..sampling import dynamic_shift

    return dynamic_shift(height, width, cfg.loss.base_shift, cfg.loss.base_size)


# --------------------------------------------------------------------------- validation grid
class Validator:
    """Every ``validation.every`` steps: fixed validation images -> LQ latent (clean) -> the EMA network with the
    teacher sampler, next to the backbone's own decode and the HQ target, saved as ``RUN/validation/step_N.png``.

    The samples are the first ``validation.images`` images of the dataset in index order. Call `run` on every
    rank (FSDP2 gathers the EMA); rank 0 samples and writes.
    """

    def __init__(self, ctx: RunContext, model: nn.Module, ema, cfg: TrainConfig) -> None:
        self.ctx, self.model, self.ema, self.cfg = ctx, model, ema, cfg
        dataset = ctx.loader.dataset
        n = min(cfg.validation.images, len(dataset))
        self.samples = [dataset[(i, 0)] for i in range(n)] if ctx.info.is_main else []
        self.folder = ctx.run_dir / "validation"
        self._copy: nn.Module | None = None

    def _fsdp_copy(self, full: dict[str, torch.Tensor]) -> nn.Module:
        """A plain network holding the gathered EMA (FSDP2 parameters are shards; sampling needs whole tensors)."""
        from ..model.net import PiDNet

        if self._copy is None:
            net_config = self.cfg.net_config
            aux = net_config.lq is not None and net_config.lq.aux_rgb_head
            with torch.device(self.ctx.info.device):
                self._copy = PiDNet(net_config, aux_head=aux).eval().requires_grad_(False)
        with torch.no_grad():
            for name, p in self._copy.named_parameters():
                p.copy_(full[name].reshape(p.shape))  # 0-d parameters are (1,) under FSDP2
        return self._copy

    @torch.no_grad()
    def run(self, step: int) -> Path | None:
        ctx = self.ctx
        if ctx.mode == "fsdp":
            full = {name: full_tensor(t) for name, t in self.ema.state_dict().items()}  # collective
            if not ctx.info.is_main:
                return None
            return self._grid(self._fsdp_copy(full), contextlib.nullcontext(), step)
        if not ctx.info.is_main:
            return None
        net = unwrap(self.model)
        was_training = net.training
        net.eval()
        try:
            return self._grid(net, self.ema.swapped(), step)
        finally:
            net.train(was_training)

    def _grid(self, net: nn.Module, weights, step: int) -> Path:
        from ..sampling import sample_teacher
        from .degrade import downsample_lq
        from .logging import save_grid

        ctx, cfg, device = self.ctx, self.cfg, self.ctx.info.device
        rows = []
        with weights, _autocast(cfg, device):
            for i, sample in enumerate(self.samples):
                hq = sample["hq"][None].to(device)  # (1, 3, H, W)
                height, width = hq.shape[-2:]
                if "text" in sample:
                    text = sample["text"][None].to(device)  # (1, T, D)
                else:
                    text = ctx.text.fixed([sample["caption"]], None)
                negative = ctx.text.negative(text) if cfg.validation.cfg_scale != 1.0 else None
                z = decoded = None
                if ctx.conditioner is not None:
                    z = ctx.conditioner.encode(downsample_lq(hq))  # (1, C, h, w), clean
                    decode = getattr(ctx.backbone, "decode", None)
                    decoded = decode(z)[0].float() if decode is not None else None
                out = sample_teacher(
                    net, z, text, 0.0 if z is not None else None, negative_text=negative, height=height, width=width,
                    steps=cfg.validation.steps, cfg_scale=cfg.validation.cfg_scale,
                    generator=torch.Generator(device).manual_seed(cfg.validation.seed + i),
                    shift=_shift(cfg, height, width),
                )
                rows.append([x for x in (decoded, out[0].float(), hq[0]) if x is not None])
        return save_grid(self.folder / f"step_{step:09d}.png", rows)
