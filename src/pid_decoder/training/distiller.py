"""DMD2 distillation of a PiD teacher into the few-step student (spec distillation.md).

Networks: student G (trainable, initialised from the teacher), its EMA (the exported weights), the frozen teacher
T (real score with CFG, and the discriminator's feature space), the fake score F (trainable, initialised from the
teacher) and the discriminator D (heads on T's block features). Iteration ``i`` updates G when
``i % student_update_freq == 0`` and F + D otherwise ("critic").

This module holds the per-iteration mechanics as small functions (`phase_of`, `gan_weight_at`, `build_optimizers`,
`clip_gradients`, `set_phase`, `distill_step`) and the run (`build_networks`, `DistillValidator`, `distill`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import NetConfig
from .config import ConfigError, format_config
from .discriminator import Discriminator, TeacherWithFeatures
from .distill_losses import (
    STUDENT_INPUT_T,
    DistillDraws,
    distill_critic_losses,
    distill_student_losses,
    draw_randomness,
)
from .distributed import (
    apply_activation_checkpointing,
    default_blocks,
    full_tensor,
    mean_over_ranks,
    unwrap,
    wrap_model,
)

logger = logging.getLogger(__name__)

STUDENT, CRITIC = "student", "critic"


def phase_of(iteration: int, student_update_freq: int) -> str:
    """``"student"`` on iterations 0, f, 2f, ...; ``"critic"`` (fake score + discriminator) otherwise."""
    return STUDENT if iteration % student_update_freq == 0 else CRITIC


def gan_weight_at(iteration: int, weight: float, warmup: int) -> float:
    """GAN generator weight, linear from 0 over ``warmup`` GLOBAL iterations (spec §5, Q1)."""
    if warmup > 0 and iteration < warmup:
        return weight * iteration / warmup
    return weight


@dataclass(frozen=True)
class OptimSettings:
    """AdamW settings of the three trainable networks (defaults: the released recipe, spec §4.4)."""

    student_lr: float = 1e-5
    student_weight_decay: float = 0.0
    student_betas: tuple[float, float] = (0.9, 0.999)
    student_warmup: int = 100
    student_f_start: float = 1e-6
    fake_score_lr: float = 1e-5
    fake_score_weight_decay: float = 1e-3
    fake_score_betas: tuple[float, float] = (0.9, 0.999)
    discriminator_lr: float = 1e-5
    discriminator_weight_decay: float = 0.0
    discriminator_betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def build_optimizers(
    student: nn.Module, fake_score: nn.Module, discriminator: nn.Module | None, s: OptimSettings, *, fused: bool = False
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, torch.optim.lr_scheduler.LambdaLR]]:
    """AdamW per trainable network (parameters that require grad at creation) and the student's LR schedule.

    Keys ``net``, ``fake_score``, ``discriminator`` (the reference's optimizer-dict names). Only the student has a
    warm-up (the others are constant, so they get no scheduler); it steps only in student phases, so it counts
    student updates. ``fused`` selects the fused student AdamW (its ``found_inf`` input lets a non-finite norm
    skip the step without a host sync).
    """
    opts = {
        "net": torch.optim.AdamW(
            _trainable(student), lr=s.student_lr, betas=s.student_betas, eps=s.eps,
            weight_decay=s.student_weight_decay, **({"fused": True} if fused else {}),
        ),
        "fake_score": torch.optim.AdamW(
            _trainable(fake_score), lr=s.fake_score_lr, betas=s.fake_score_betas, eps=s.eps,
            weight_decay=s.fake_score_weight_decay,
        ),
    }
    if discriminator is not None:
        opts["discriminator"] = torch.optim.AdamW(
            list(discriminator.parameters()), lr=s.discriminator_lr, betas=s.discriminator_betas, eps=s.eps,
            weight_decay=s.discriminator_weight_decay,
        )
    from .schedules import LambdaLinear

    warm = LambdaLinear(warm_up=s.student_warmup, f_start=s.student_f_start, f_max=1.0, f_min=1.0,
                        cycle_length=max(10_000_000, s.student_warmup + 1))
    return opts, {"net": torch.optim.lr_scheduler.LambdaLR(opts["net"], warm)}


PHASE_OPTIMIZERS = {STUDENT: ("net",), CRITIC: ("fake_score", "discriminator")}


def _grads(module: nn.Module | None) -> list[torch.Tensor]:
    return [] if module is None else [p.grad for p in module.parameters() if p.grad is not None]


def clip_gradients(
    student: nn.Module, fake_score: nn.Module, discriminator: nn.Module | None, clip_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN/inf gradients -> 0 in all three nets; F and G clipped to ``clip_norm`` SEPARATELY; D not clipped
    (spec §4.3, Q10). Returns the pre-clip norms (G, F) as device tensors (0 for a net without gradients).

    After the zeroing only G's norm can be non-finite (float32 overflow); the reference then skips the step,
    which `distill_step` does on the device through the fused AdamW's ``found_inf``.
    """
    for grad in _grads(student) + _grads(fake_score) + _grads(discriminator):
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
    norms = []
    for module in (student, fake_score):
        params = [p for p in module.parameters() if p.grad is not None]
        if params:
            grads = [p.grad for p in params]
            norm = full_tensor(torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True))
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm, foreach=True)
        else:
            norm = torch.zeros((), device=next(module.parameters()).device)
        norms.append(norm)
    return norms[0], norms[1]


def set_phase(phase: str, student: nn.Module, fake_score: nn.Module, discriminator: nn.Module | None) -> None:
    """Train/eval modes per phase (spec §4.2; the nets have no dropout, so values do not depend on it).

    ``requires_grad`` is not toggled: the idle network of a phase runs under ``no_grad`` (student in the critic
    step, fake score in the student step) and the losses freeze D for the generator term themselves, so the flags
    set at build (the frozen last-block text branch, Q13) stay as they are and DDP/FSDP see fixed parameter sets.
    """
    student.train(phase == STUDENT)
    fake_score.train(phase == CRITIC)
    if discriminator is not None:
        discriminator.train(phase == CRITIC)


@dataclass
class DistillNets:
    """Everything `distill_step` needs besides the batch: networks, embeddings and recipe weights."""

    student: nn.Module
    teacher: object  # TeacherWithFeatures protocol
    fake_score: nn.Module
    discriminator: nn.Module | None
    null_text: torch.Tensor  # (1, T, Dt) negative-prompt embedding (teacher CFG)
    student_update_freq: int = 6
    t_list: tuple[float, ...] = STUDENT_INPUT_T
    cfg_scale: float = 3.0
    vsd_weight: float = 1.0
    dsm_weight: float = 1.0
    gan_weight: float = 0.05
    gan_warmup: int = 100
    r1_weight: float = 200.0
    r1_alpha: float = 0.1
    clip_norm: float = 0.1
    amp_dtype: torch.dtype | None = None


def distill_step(
    nets: DistillNets,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, object],
    ema_update: Callable[[int], None] | None,
    batch: Mapping[str, torch.Tensor],
    draws: DistillDraws,
    iteration: int,
) -> dict[str, torch.Tensor]:
    """One distillation iteration (spec §4.2): phase flags, loss, backward, NaN-zeroing + clip, the phase's
    optimizer steps (critic: F then D) and schedulers, the EMA update after a student step (called with the
    student-update index ``iteration // student_update_freq``), zero_grad.

    ``batch``: ``hq`` (B, 3, H, W), ``lq_latent``, ``text`` (B, T, Dt), ``degrade_sigma`` (B,), optional
    ``caption_keep`` (B,) bool + ``empty_text`` (1, T, Dt). Returns the phase's loss dict plus ``grad_norm``.
    """
    phase = phase_of(iteration, nets.student_update_freq)
    G, F_, D = nets.student, nets.fake_score, nets.discriminator
    set_phase(phase, G, F_, D)
    # The generator term evaluates D frozen: call the module itself, not its DDP wrapper (no gradient sync).
    D_used = (unwrap(D) if phase == STUDENT else D) if D is not None else None
    args = (G, nets.teacher, F_, D_used, batch["hq"], batch["lq_latent"], batch["text"], batch["degrade_sigma"])
    common = {
        "k": draws.k, "noise": draws.noise, "t": draws.t, "eps": draws.eps, "caption_keep": batch.get("caption_keep"),
        "empty_text": batch.get("empty_text"), "t_list": nets.t_list, "amp_dtype": nets.amp_dtype,
    }
    if phase == STUDENT:
        losses = distill_student_losses(
            *args, nets.null_text, cfg_scale=nets.cfg_scale, vsd_weight=nets.vsd_weight,
            gan_weight=gan_weight_at(iteration, nets.gan_weight, nets.gan_warmup) if D is not None else 0.0,
            **common,
        )
    else:
        losses = distill_critic_losses(
            *args, r1_noise=draws.r1_noise, dsm_weight=nets.dsm_weight, r1_weight=nets.r1_weight,
            r1_alpha=nets.r1_alpha, **common,
        )
    losses["total"].backward()
    losses["grad_norm"], losses["fake_grad_norm"] = clip_gradients(G, F_, D, nets.clip_norm)
    names = [n for n in PHASE_OPTIMIZERS[phase] if n in optimizers]
    for name in names:
        opt = optimizers[name]
        if name == "net" and opt.defaults.get("fused"):
            opt.found_inf = (~torch.isfinite(losses["grad_norm"])).float()  # skip without a host sync
            opt.step()
            opt.found_inf = None
        else:
            opt.step()
    for name in names:
        if name in schedulers:
            schedulers[name].step()
    if phase == STUDENT and ema_update is not None:
        ema_update(iteration // nets.student_update_freq)
    for name in names:
        optimizers[name].zero_grad(set_to_none=True)
    for module in (G, F_):
        # FSDP2 keeps the root's parameters unsharded after a forward without backward (the idle network of the
        # phase ran under no_grad); reshard so parameters, optimizer and checkpoint see the sharded tensors again.
        reshard = getattr(module, "reshard", None)
        if callable(reshard):
            reshard()
    return losses


# =========================================================================== the distillation run
# Seeds of the per-iteration generators: the randomness of iteration i depends only on (run.seed, i, global
# sample index), so a resume needs no RNG state and any process count with the same global batch draws the
# same numbers (each rank keeps its rows of the global draw).
_COND_STREAM, _STEP_STREAM = 0x5EED_C0D, 0x5EED_57E


def _iteration_seed(seed: int, iteration: int, stream: int) -> int:
    return (seed * 1_000_003 + iteration * 7_919 + stream) % (1 << 62)


def student_net_config(cfg) -> NetConfig:
    """The network of student, fake score and teacher: the run's, with the aux LQ-RGB head off (spec §1)."""
    net = cfg.net_config
    if net.lq is not None and net.lq.aux_rgb_head:
        net = dataclasses.replace(net, lq=dataclasses.replace(net.lq, aux_rgb_head=False))
    return net


def check_distill_config(cfg) -> None:
    """Cross-section checks of a distillation config (one ConfigError naming the key)."""
    d = cfg.distill
    if d is None:
        raise ConfigError("this config has no [distill] section; `pid-decoder distill` needs one (configs/distill/)")
    if not d.teacher:
        raise ConfigError("distill.teacher is empty: give the undistilled teacher (a .pth/.safetensors file or a "
                          "teacher run directory)")
    for key in ("teacher", "student_init"):
        path = getattr(d, key)
        if path and not Path(path).exists():
            raise ConfigError(f"distill.{key} not found: {path}")
    if d.negative_embedding and not Path(d.negative_embedding).is_file():
        raise ConfigError(f"distill.negative_embedding file not found: {d.negative_embedding}")
    if cfg.model.aux_rgb_head:
        raise ConfigError("distillation trains without the aux LQ-RGB head (spec §1): set model.aux_rgb_head = false")
    if cfg.net_config.lq is None:
        raise ConfigError("distillation needs a PiD network with an LQ branch (model.preset / [model.net.lq])")
    from ..sampling import STUDENT_T_LIST

    if tuple(d.t_list) != STUDENT_T_LIST:
        # The student is sampled (pid_decoder.sample, the validation grid, the released pipeline) on this list.
        raise ConfigError(f"distill.t_list must be the student sampler's list {list(STUDENT_T_LIST)}, got "
                          f"{list(d.t_list)}")
    if not 0 < d.t_clamp[0] < d.t_clamp[1] < 1:
        raise ConfigError(f"distill.t_clamp must satisfy 0 < low < high < 1, got {list(d.t_clamp)}")
    depth = cfg.net_config.patch_depth
    if d.gan_weight > 0 and not any(0 <= i < depth for i in d.feature_indices):
        raise ConfigError(f"distill.feature_indices {list(d.feature_indices)} name no block of the {depth}-block net")
    if cfg.model.trainable != "full":
        raise ConfigError("distillation trains the whole student (spec §1): set model.trainable = \"full\"")


def _weights(path: str, net_config: NetConfig) -> dict[str, torch.Tensor]:
    """Float32 network weights (aux head excluded) from a .pth/.safetensors file or a teacher run directory."""
    from ..checkpoints import load_network

    folder = Path(path)
    if folder.is_dir():
        from .export import load_run_network

        net = load_run_network(folder, which="ema")
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("lq_proj.lq_aux_rgb_head.")}
    else:
        # Inference loading: the aux head's keys (released undistilled files carry them) are ignored, spec §1.
        state = load_network(folder, net_config, dtype=torch.float32).state_dict()
    return state


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    from ..keys import key_problems

    problems = key_problems({k: tuple(v.shape) for k, v in net.state_dict().items()},
                            {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise ValueError(f"{what} does not fit the configured network: " + "; ".join(problems))
    net.load_state_dict(state, strict=True)


def build_networks(cfg, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module, Discriminator | None]:
    """(student, teacher, fake score, discriminator) on ``device``, before wrapping.

    Student and fake score: float32, trainable as ``set_trainable(net, "full")``; both start from the teacher
    (the student from ``distill.student_init`` when given). Teacher: frozen, eval, bf16 weights under bf16
    precision on CUDA (float32 otherwise), no optimizer state. D: default init from ``run.seed`` (same on every
    rank), None when ``distill.gan_weight`` is 0.
    """
    from ..model.net import PiDNet
    from .params import set_trainable

    d, net_config = cfg.distill, student_net_config(cfg)
    teacher_state = _weights(d.teacher, net_config)
    nets = []
    for init in (d.student_init, "", ""):  # student, teacher, fake score
        net = PiDNet(net_config)
        what = f"distill.student_init ({init})" if init else f"distill.teacher ({d.teacher})"
        _load_into(net, _weights(init, net_config) if init else teacher_state, what)
        nets.append(net.to(device=device, dtype=torch.float32))
    student, teacher, fake = nets
    for net in (student, fake):
        set_trainable(net, "full")
        net.train()
    bf16 = cfg.run.precision == "bf16" and device.type == "cuda"
    teacher = teacher.to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False).eval()
    disc = None
    if d.gan_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            disc = Discriminator(net_config.hidden_size, d.feature_indices, net_config.patch_depth,
                                 d.disc_conv_layers)
        disc = disc.to(device)
    return student, teacher, fake, disc


def negative_embedding(cfg, text_source, net_config: NetConfig, device: torch.device) -> torch.Tensor:
    """(1, T, D) float32: the teacher's unconditional (negative-prompt) embedding (spec §3.7, Q6)."""
    if cfg.distill.negative_embedding:
        from ..text import load_text_embedding

        emb, _ = load_text_embedding(cfg.distill.negative_embedding)
        emb = emb if emb.ndim == 3 else emb[None]
        if emb.shape[0] != 1 or emb.shape[-1] != net_config.txt_embed_dim:
            raise ValueError(f"distill.negative_embedding holds shape {tuple(emb.shape)}; expected (1, T, "
                             f"{net_config.txt_embed_dim}) (write it with `pid-decoder embed`)")
        return emb.float().to(device)
    if text_source.mode == "encoder":
        return text_source.encoder.encode_negative(1).float().to(device)
    if text_source.mode == "zeros":
        return torch.zeros(1, net_config.txt_max_length, net_config.txt_embed_dim, device=device)
    raise ConfigError("data.text uses precomputed embeddings: set distill.negative_embedding to the negative "
                      "prompt's embedding file (`pid-decoder embed` of pid_decoder.text.NEGATIVE_PROMPT)")


def _draw_condition(cfg, batch_global: int, rows: slice, latent_shape: tuple[int, ...], device: torch.device,
                    generator: torch.Generator):
    """Latent noising (apply, sigma, eps) and caption dropout for this rank's rows of the global batch."""
    from .conditioning import draw_latent_noise, dropout_mask

    c = cfg.conditioning
    apply, sigma, eps = draw_latent_noise((batch_global, *latent_shape), generator, prob=c.noise_prob,
                                          sigma_max=c.sigma_max)
    drop = dropout_mask(batch_global, c.caption_dropout, generator)[rows]
    eps = eps[rows].to(device, non_blocking=True) if eps is not None else None
    return apply[rows].to(device), sigma[rows].to(device), eps, drop


class DistillValidator:
    """Every ``validation.every`` iterations: fixed LQ latents (clean) of the first ``validation.images`` dataset
    images through the student EMA (``distill.sample_steps`` steps), the teacher (its own sampler,
    ``validation.steps`` steps, CFG ``validation.cfg_scale`` against the negative embedding) and the backbone
    decode, saved side by side with the HQ image as ``RUN/validation/step_N.png``; returns the mean absolute
    student-teacher difference (pixels in [-1, 1]). Call on every rank (FSDP2 gathers the EMA)."""

    def __init__(self, ctx, cfg, student_model: nn.Module, ema, teacher: nn.Module, null_text: torch.Tensor):
        self.ctx, self.cfg, self.model, self.ema, self.teacher, self.null = ctx, cfg, student_model, ema, teacher, null_text
        n = min(cfg.validation.images, len(ctx.loader.dataset))
        self.samples = [ctx.loader.dataset[(i, 0)] for i in range(n)] if ctx.info.is_main else []
        self.folder = ctx.run_dir / "validation"
        self._teacher_out: dict[int, torch.Tensor] = {}
        self._copy: nn.Module | None = None

    def _inputs(self, i: int, sample: dict):
        from .degrade import downsample_lq

        device = self.ctx.info.device
        hq = sample["hq"][None].to(device)  # (1, 3, H, W)
        text = sample["text"][None].to(device) if "text" in sample else self.ctx.text.fixed([sample["caption"]], None)
        z = self.ctx.conditioner.encode(downsample_lq(hq))  # (1, C, h, w), clean
        return hq, text.float(), z

    @torch.no_grad()
    def run(self, step: int) -> tuple[Path, float] | None:
        from ..model.net import PiDNet
        from ..sampling import sample, sample_teacher
        from .logging import save_grid
        from .trainer import _autocast, _shift

        ctx, cfg, device = self.ctx, self.cfg, self.ctx.info.device
        if ctx.mode == "fsdp":
            full = {name: full_tensor(t) for name, t in self.ema.state_dict().items()}  # collective
            if not ctx.info.is_main:
                return None
            if self._copy is None:
                with torch.device(device):
                    self._copy = PiDNet(student_net_config(cfg)).eval().requires_grad_(False)
            for name, p in self._copy.named_parameters():
                p.copy_(full[name])
            net, weights = self._copy, contextlib.nullcontext()
        else:
            if not ctx.info.is_main:
                return None
            net, weights = unwrap(self.model), self.ema.swapped()
        rows, dist = [], []
        was_training = net.training
        net.eval()
        try:
            with weights, _autocast(cfg, device):
                for i, s in enumerate(self.samples):
                    hq, text, z = self._inputs(i, s)
                    H, W = hq.shape[-2:]
                    gen = torch.Generator(device).manual_seed(cfg.validation.seed + i)
                    student = sample(net, z, text, 0.0, height=H, width=W, steps=cfg.distill.sample_steps,
                                     generator=gen)[0].float()
                    if i not in self._teacher_out:  # fixed inputs and seed: the teacher's output never changes
                        self._teacher_out[i] = sample_teacher(
                            self.teacher, z, text, 0.0, negative_text=self.null, height=H, width=W,
                            steps=cfg.validation.steps, cfg_scale=cfg.validation.cfg_scale, shift=_shift(cfg, H, W),
                            generator=torch.Generator(device).manual_seed(cfg.validation.seed + i),
                        )[0].float()
                    teacher = self._teacher_out[i]
                    decoded = self.ctx.backbone.decode(z)[0].float()
                    dist.append((student - teacher).abs().mean())
                    rows.append([decoded, student, teacher, hq[0]])
        finally:
            net.train(was_training)
        path = save_grid(self.folder / f"step_{step:09d}.png", rows)
        return path, float(torch.stack(dist).mean()) if dist else float("nan")


def distill(
    cfg,
    *,
    resume: str | bool | None = None,
    info=None,
    stop=None,
    on_step: Callable[[int, dict], None] | None = None,
):
    """Run (or continue) a DMD2 distillation run (`pid-decoder distill CONFIG`); returns a `trainer.TrainResult`.

    ``run.max_steps`` counts iterations (student and critic). Arguments as `trainer.train`. The checkpoint holds
    ``net`` (student), ``net_ema``, ``fake_score``, ``discriminator``, their optimizers, the student's LR
    schedule, the data position and the iteration; `export.export_run` writes the student EMA.
    """
    from ..checkpoints import atomic_write
    from .checkpoint import ModelState, OptimizerState
    from .conditioning import LQConditioner, latent_noise
    from .degrade import downsample_lq
    from .logging import RunLogger
    from .schedules import EMA
    from .trainer import StopSignal, TextSource, TrainResult, build_backbone, build_data, prepare_run

    check_distill_config(cfg)
    d = cfg.distill
    # ---- 1. inputs checked, run directory, data, backbone, text: no network yet
    ctx = prepare_run(cfg, resume=resume, info=info)
    info, device = ctx.info, ctx.info.device
    if info.is_main:
        logger.info("distillation config:\n%s", format_config(cfg))
        atomic_write(ctx.run_dir / "config.json", lambda tmp: Path(tmp).write_text(cfg.to_json()))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.run.tf32
        torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    loader = ctx.loader = build_data(ctx)
    net_config = student_net_config(cfg)
    ctx.backbone = build_backbone(cfg.conditioning.backbone, cfg.conditioning.backbone_path, device)
    # encode only: noising and dropout are drawn below from the per-iteration generator
    ctx.conditioner = LQConditioner(ctx.backbone, net_config, noise_prob=0.0, caption_dropout=0.0, lq_dropout=0.0)
    text_mode = cfg.data.text if cfg.data.text != "auto" else ("embeddings" if loader.empty_text is not None else "encoder")
    ctx.text = TextSource(text_mode, net_config, empty=loader.empty_text, encoder=cfg.data.text_encoder, device=device)
    null_text = negative_embedding(cfg, ctx.text, net_config, device)

    # ---- 2. networks, wrapping, optimizers, EMA, checkpoint state
    student, teacher, fake, disc = build_networks(cfg, device)
    ckpt = cfg.model.activation_checkpointing
    student_model = wrap_model(student, ctx.mode, checkpointing=ckpt, info=info)
    fake_model = wrap_model(fake, ctx.mode, checkpointing=ckpt, info=info)
    if ckpt:  # the generator's GAN term backpropagates through the teacher's first blocks
        apply_activation_checkpointing(default_blocks(teacher))
    disc_model = disc
    if disc is not None and info.enabled:  # small: replicated (DDP) in every parallel mode
        disc_model = nn.parallel.DistributedDataParallel(
            disc, device_ids=[device.index] if device.type == "cuda" else None)
    settings = OptimSettings(
        student_lr=cfg.optim.lr, student_weight_decay=cfg.optim.weight_decay, student_betas=tuple(cfg.optim.betas),
        student_warmup=cfg.optim.warmup_steps, student_f_start=cfg.optim.warmup_start,
        fake_score_lr=d.fake_score_lr, fake_score_weight_decay=d.fake_score_weight_decay,
        fake_score_betas=tuple(d.fake_score_betas), discriminator_lr=d.discriminator_lr,
        discriminator_weight_decay=d.discriminator_weight_decay, eps=cfg.optim.eps,
    )
    optimizers, schedulers = build_optimizers(unwrap(student_model), unwrap(fake_model), disc, settings,
                                              fused=cfg.optim.fused and device.type in ("cuda", "cpu"))
    ema = EMA(unwrap(student_model).named_parameters(), cfg.ema.rate)
    progress = {"step": 0}
    state = {
        "net": ModelState(student_model), "net_ema": ema, "fake_score": ModelState(fake_model),
        "optim_net": OptimizerState(student_model, optimizers["net"]),
        "optim_fake_score": OptimizerState(fake_model, optimizers["fake_score"]),
        "scheduler_net": schedulers["net"], "data": loader, "trainer": progress,
    }
    if disc is not None:
        state["discriminator"] = ModelState(disc)
        state["optim_discriminator"] = OptimizerState(disc, optimizers["discriminator"])
    if ctx.resume_from is not None:
        progress["step"] = ctx.manager.load(ctx.resume_from, state)
    step = start = int(progress["step"])
    nets = DistillNets(
        student_model, TeacherWithFeatures(teacher, disc.indices if disc is not None else (0,)), fake_model,
        disc_model, null_text, student_update_freq=d.student_update_freq, t_list=tuple(d.t_list[:-1]),
        cfg_scale=d.teacher_cfg_scale, vsd_weight=d.vsd_weight, dsm_weight=d.dsm_weight, gan_weight=d.gan_weight,
        gan_warmup=d.gan_warmup, r1_weight=d.r1_weight, r1_alpha=d.r1_alpha, clip_norm=cfg.optim.grad_clip,
        amp_dtype=torch.bfloat16 if cfg.run.precision == "bf16" else None,
    )
    logger.info("distillation: student %.1f M trainable, fake score %.1f M, discriminator %.1f M, teacher %s; "
                "parallel %s", _count(student), _count(fake), _count(disc) if disc is not None else 0.0,
                next(teacher.parameters()).dtype, ctx.mode)

    # ---- 3. the loop (one iteration = one student OR one critic update)
    stop = stop or StopSignal()
    validator = DistillValidator(ctx, cfg, student_model, ema, teacher, null_text) if cfg.validation.every else None
    log = RunLogger(ctx.run_dir, cfg.run.max_steps, start, info=info, tensorboard=cfg.log.tensorboard,
                    progress=cfg.log.progress, desc="distill")
    names = ("vsd", "gan_gen", "dsm", "disc", "r1", "grad_norm", "fake_grad_norm")
    sums = torch.zeros(len(names), device=device)
    counts = {STUDENT: 0, CRITIC: 0}
    last_saved = start if ctx.resume_from is not None else None
    record: dict[str, float] = {}
    batches = iter(loader)
    stopped = False
    with stop:
        while step < cfg.run.max_steps:
            batch = next(batches)
            hq = batch["hq"].to(device, non_blocking=True)  # (B, 3, H, W)
            b = hq.shape[0]
            rows = slice(info.rank * b, (info.rank + 1) * b)  # this rank's rows of the global batch
            gen_cond = torch.Generator("cpu").manual_seed(_iteration_seed(cfg.run.seed, step, _COND_STREAM))
            gen_step = torch.Generator(device).manual_seed(_iteration_seed(cfg.run.seed, step, _STEP_STREAM))
            z = ctx.conditioner.encode(downsample_lq(hq))  # (B, C, h, w), clean
            apply, sigma, eps_z, drop = _draw_condition(cfg, b * info.world, rows, tuple(z.shape[1:]), device,
                                                        gen_cond)
            z, sigma = latent_noise(z, apply=apply, sigma=sigma, eps=eps_z, frame=ctx.conditioner.frame)
            text = ctx.text(batch, drop)  # (B, T, D); LQ-latent dropout: never (recipe rate 0)
            phase = phase_of(step, d.student_update_freq)
            draws = draw_randomness(gen_step, (b * info.world, *hq.shape[1:]), critic=phase == CRITIC,
                                    clamp=tuple(d.t_clamp), device=device, rows=rows, num_t=len(d.t_list) - 1)
            losses = distill_step(nets, optimizers, schedulers, ema.update,
                                  {"hq": hq, "lq_latent": z, "text": text, "degrade_sigma": sigma}, draws, step)
            counts[phase] += 1
            sums += torch.stack([losses[n].detach().float() if n in losses else torch.zeros((), device=device)
                                 for n in names])
            step += 1
            log.step(step, b * info.world)
            if on_step is not None:
                on_step(step, {"phase": phase, **{k: v.detach() for k, v in losses.items()}})
            if step % cfg.log.every == 0 or step == cfg.run.max_steps:
                avg = mean_over_ranks(sums, info).tolist()  # the loop's host sync
                ns, nc = max(counts[STUDENT], 1), max(counts[CRITIC], 1)
                per = dict(zip(names, avg))
                record = log.metrics(step, {
                    "loss": per["vsd"] / ns, "vsd": per["vsd"] / ns, "gan_gen": per["gan_gen"] / ns,
                    "dsm": per["dsm"] / nc, "disc": per["disc"] / nc, "r1": per["r1"] / nc,
                    "grad_norm": per["grad_norm"] / ns, "fake_grad_norm": per["fake_grad_norm"] / nc,
                    "lr": schedulers["net"].get_last_lr()[0],
                    "gan_weight": gan_weight_at(step - 1, d.gan_weight, d.gan_warmup),
                })
                sums.zero_()
                counts = {STUDENT: 0, CRITIC: 0}
            if validator is not None and step % cfg.validation.every == 0:
                result = validator.run(step)
                if result is not None:
                    path, distance = result
                    log.image("validation", step, path)
                    log.metrics(step, {"val_student_teacher_l1": distance})
            if stop.requested(info):
                stopped = True
                break
            if step % cfg.checkpoint.every == 0:
                ctx.manager.save(step, state)
                last_saved = step
    # ---- 4. final checkpoint (also after a stop signal)
    checkpoint = ctx.manager.latest()
    progress["step"] = step
    if last_saved != step:
        checkpoint = ctx.manager.save(step, state)
    if stopped:
        log.message(f"stopped at iteration {step}; resume with --resume")
    log.close()
    return TrainResult(step, stopped, checkpoint, record)


def _count(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6
