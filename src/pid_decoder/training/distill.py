"""DMD2 distillation of a PiD teacher into the few-step student (spec distillation.md).

Networks: student G (trainable, initialised from the teacher), its EMA (the exported weights), the frozen teacher
T (real score with CFG, and the discriminator's feature space), the fake score F (trainable, initialised from the
teacher) and the discriminator D (heads on T's block features). Iteration ``i`` updates G when
``i % student_update_freq == 0`` and F + D otherwise ("critic").

This module holds the per-iteration mechanics as small functions (`phase_of`, `gan_weight_at`,
`student_lr_factor`, `build_optimizers`, `clip_gradients`, `distill_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import unwrap
from .distill_losses import STUDENT_INPUT_T, DistillDraws, distill_critic_losses, distill_student_losses

STUDENT, CRITIC = "student", "critic"


def phase_of(iteration: int, student_update_freq: int) -> str:
    """``"student"`` on iterations 0, f, 2f, ...; ``"critic"`` (fake score + discriminator) otherwise."""
    return STUDENT if iteration % student_update_freq == 0 else CRITIC


def gan_weight_at(iteration: int, weight: float, warmup: int) -> float:
    """GAN generator weight, linear from 0 over ``warmup`` GLOBAL iterations (spec §5, Q1)."""
    if warmup > 0 and iteration < warmup:
        return weight * iteration / warmup
    return weight


def student_lr_factor(update: int, warmup: int, f_start: float = 1e-6) -> float:
    """LambdaLinear multiplier of the student LR; ``update`` counts STUDENT updates (spec §4.4, Q1)."""
    if warmup > 0 and update < warmup:
        return f_start + (1.0 - f_start) * update / warmup
    return 1.0


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
    student: nn.Module, fake_score: nn.Module, discriminator: nn.Module | None, s: OptimSettings
) -> tuple[dict[str, torch.optim.Optimizer], dict[str, torch.optim.lr_scheduler.LambdaLR]]:
    """AdamW per trainable network (parameters that require grad at creation) and their LR schedules.

    Keys ``net``, ``fake_score``, ``discriminator`` (the reference's optimizer-dict names). Only the student has a
    warm-up; a scheduler steps only in its own phase, so the student's counts student updates.
    """
    fused = {"fused": True} if next(student.parameters()).is_cuda else {}
    opts = {
        "net": torch.optim.AdamW(
            _trainable(student), lr=s.student_lr, betas=s.student_betas, eps=s.eps,
            weight_decay=s.student_weight_decay, **fused,
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
    warm = s.student_warmup
    scheds = {
        "net": torch.optim.lr_scheduler.LambdaLR(opts["net"], lambda n: student_lr_factor(n, warm, s.student_f_start)),
    }
    for name in ("fake_score", "discriminator"):
        if name in opts:
            scheds[name] = torch.optim.lr_scheduler.LambdaLR(opts[name], lambda n: 1.0)
    return opts, scheds


PHASE_OPTIMIZERS = {STUDENT: ("net",), CRITIC: ("fake_score", "discriminator")}


def _grads(module: nn.Module | None) -> list[torch.Tensor]:
    return [] if module is None else [p.grad for p in module.parameters() if p.grad is not None]


def clip_gradients(
    student: nn.Module, fake_score: nn.Module, discriminator: nn.Module | None, clip_norm: float
) -> torch.Tensor:
    """NaN/inf gradients -> 0 in all three nets; F and G clipped to ``clip_norm`` SEPARATELY; D not clipped
    (spec §4.3, Q10). Returns G's pre-clip norm (0 when G has no gradients) as a device tensor (no host sync).

    Deviation: the reference skips the optimizer steps when a norm is non-finite. After the NaN/inf zeroing a
    norm can only be non-finite by float32 overflow; here the clip then scales those gradients to zero instead,
    which avoids a host sync per iteration.
    """
    for grad in _grads(student) + _grads(fake_score) + _grads(discriminator):
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
    norm = torch.zeros((), device=next(student.parameters()).device)
    for module in (fake_score, student):
        params = [p for p in module.parameters() if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    return norm


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
    common = dict(
        k=draws.k, noise=draws.noise, t=draws.t, eps=draws.eps, caption_keep=batch.get("caption_keep"),
        empty_text=batch.get("empty_text"), t_list=nets.t_list, amp_dtype=nets.amp_dtype,
    )
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
    losses["grad_norm"] = clip_gradients(G, F_, D, nets.clip_norm)
    names = [n for n in PHASE_OPTIMIZERS[phase] if n in optimizers]
    for name in names:
        optimizers[name].step()
    for name in names:
        if name in schedulers:
            schedulers[name].step()
    if phase == STUDENT and ema_update is not None:
        ema_update(iteration // nets.student_update_freq)
    for name in names:
        optimizers[name].zero_grad(set_to_none=True)
    return losses
