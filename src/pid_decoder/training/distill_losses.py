"""DMD2 distillation losses (spec distillation.md §5-§6, §8): pure functions of nets, batch and explicit draws.

Legend: B batch, H/W pixels, T text tokens, Dt text width. Flow frame ``x_t = (1 - t) x0 + t eps``; every net
returns the velocity ``v = eps - x0`` and receives ``1000 t``; ``x0 = x_t - t v`` is evaluated in float64 and
rounded to float32.

Networks (anything with the PiDNet training call ``net.forward_train(x, 1000 t, text, lq_latent, degrade_sigma)
-> (v, aux)``, e.g. a `distributed.wrap_model` result; aux heads are off in distillation):
- ``student`` G (trained in the student step), ``fake_score`` F (trained in the critic step);
- ``teacher`` T: frozen, with the `TeacherWithFeatures` protocol (``forward_train``, ``with_features``,
  ``features``), the feature space of the discriminator;
- ``discriminator`` D: features -> logits (B, n), or None (GAN off).

Student input (``student_input_mode``): "teacher_forcing" (the recipes, spec §5(a), Q7) noises the real image to
``t_list[k_b]`` per sample; "pidself_rollout" (spec §12) runs the student itself from pure noise for ``k`` steps
without grad (one ``k`` for the whole batch) and takes its x0 prediction at ``t_list[k]`` (`self_rollout_x0`).

Precision (spec §8): ``amp_dtype`` (bf16 in the recipes, None = plain float32, e.g. on CPU) is the autocast
of every net forward in the student step and of the student sample + fake-score forward + DSM in the critic step;
the critic step's teacher features, D, its loss and R1 always run without autocast. The VSD loss is float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TIMESCALE = 1000.0
STUDENT_INPUT_T = (0.999, 0.866, 0.634, 0.342)  # the student t list without its final 0.0
STUDENT_INPUT_MODES = ("teacher_forcing", "pidself_rollout")
SAMPLE_TYPES = ("sde", "ode")


@dataclass
class DistillDraws:
    """The randomness of one distillation iteration (either phase).

    ``k`` int64 index into the student t list: (B,) per sample for teacher forcing, (1,) for the whole batch for
    the self-rollout; ``noise`` (B, 3, H, W) the student-input noise; ``t`` (B,) the perturbation time (already
    clamped); ``eps`` (B, 3, H, W) the perturbation noise; ``r1_noise`` (B, 3, H, W) the R1 pixel noise (critic
    step only); ``rollout_noise`` (k, B, 3, H, W) the SDE re-noising of the self-rollout's k steps (None for
    teacher forcing and the ODE rollout).
    """

    k: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    r1_noise: torch.Tensor | None = None
    rollout_noise: torch.Tensor | None = None


def perturbation_t(u: torch.Tensor, clamp: tuple[float, float] = (0.02, 0.99)) -> torch.Tensor:
    """Logit-normal(0, 1) time from standard-normal ``u``, clamped; no shift (spec §5(b), Q15)."""
    return torch.sigmoid(u).clamp(clamp[0], clamp[1])


def draw_randomness(
    generator: torch.Generator,
    shape: tuple[int, int, int, int],
    *,
    num_t: int = len(STUDENT_INPUT_T),
    critic: bool = False,
    clamp: tuple[float, float] = (0.02, 0.99),
    device: torch.device | str = "cpu",
    rows: slice | None = None,
    student_input_mode: str = "teacher_forcing",
    sample_type: str = "sde",
) -> DistillDraws:
    """Draw one iteration's randomness from ``generator`` in the reference's order (spec §8):
    student noise -> k -> perturbation normal -> eps (-> R1 noise in the critic step). The self-rollout draws
    one k for the whole batch and, with ``sample_type`` "sde", one re-noising per rollout step right after it
    (PDM 627-730).

    ``shape`` is the batch the draws are made for; ``rows`` keeps a slice of it (a rank's part of the global
    batch, so that any number of processes with the same global batch draws the same numbers).
    """
    _check_input_mode(student_input_mode, sample_type)
    B = shape[0]
    gen_dev = generator.device
    keep = rows if rows is not None else slice(None)

    def randn(s):
        return torch.randn(s, generator=generator, device=gen_dev)[keep].to(device)

    noise = randn(shape)
    rollout = None
    if student_input_mode == "teacher_forcing":
        k = torch.randint(0, num_t, (B,), generator=generator, device=gen_dev)[keep].to(device)
    else:
        k = torch.randint(0, num_t, (1,), generator=generator, device=gen_dev)
        if sample_type == "sde":  # the draw count depends on k: one host sync per iteration, as in the reference
            steps = int(k)
            rollout = torch.stack([randn(shape) for _ in range(steps)]) if steps else noise.new_empty((0, *noise.shape))
        k = k.to(device)
    t = perturbation_t(randn((B,)), clamp)
    eps = randn(shape)
    r1 = randn(shape) if critic else None
    return DistillDraws(k=k, noise=noise, t=t, eps=eps, r1_noise=r1, rollout_noise=rollout)


def velocity(net, x, t, text, lq_latent, degrade_sigma) -> torch.Tensor:
    return net.forward_train(x, t, text, lq_latent, degrade_sigma)[0]


def _b(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x_t - t v`` in float64, rounded to the dtype of ``x_t`` (differentiable)."""
    return (x_t.double() - _b(t).double() * v.double()).to(x_t.dtype)


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (1 - _b(t)) * x0 + _b(t) * noise


def vsd_loss(x0_s: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD/VSD loss in float64 (spec §5): ``0.5 mean((x0_s - sg(x0_s - g))^2)`` with
    ``g = (x0_fake - x0_teacher) / (mean_b|x0_s - x0_teacher| + 1e-6)`` (NaN/inf in g zeroed). float64 scalar."""
    s = x0_s.double()
    with torch.no_grad():
        teacher, fake = x0_teacher.double(), x0_fake.double()
        weight = 1.0 / ((s - teacher).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)  # (B, 1, 1, 1)
        grad = torch.nan_to_num((fake - teacher) * weight, nan=0.0, posinf=0.0, neginf=0.0)
        target = s - grad
    return 0.5 * F.mse_loss(s, target)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` do not require grad inside the block (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _caption(text: torch.Tensor, keep: torch.Tensor | None, empty_text: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return text
    if empty_text is None:
        raise ValueError("caption_keep given without empty_text (the embedding of the empty caption)")
    return torch.where(keep.bool().view(-1, 1, 1), text, empty_text.expand_as(text))  # (B, T, Dt)


def teacher_forcing_x0(student, hq, text, lq_latent, degrade_sigma, k, noise, t_list) -> torch.Tensor:
    """The student's one-step x0 from the real image noised to ``t_list[k]`` per sample (spec §5(a), Q7)."""
    s = torch.as_tensor(t_list, dtype=torch.float32, device=hq.device)[k]  # (B,)
    x_in = noised(hq, s, noise)
    v = velocity(student, x_in, TIMESCALE * s, text, lq_latent, degrade_sigma)
    return x0_from_velocity(x_in, s, v)


def _check_input_mode(mode: str, sample_type: str) -> None:
    if mode not in STUDENT_INPUT_MODES:
        raise ValueError(f"student_input_mode must be one of {STUDENT_INPUT_MODES}, got {mode!r}")
    if sample_type not in SAMPLE_TYPES:
        raise ValueError(f"sample_type must be one of {SAMPLE_TYPES}, got {sample_type!r}")


def _rollout_steps(k, num_t: int) -> int:
    """The self-rollout's k as a Python int (one for the whole batch)."""
    if torch.is_tensor(k):
        if k.numel() != 1:
            raise ValueError(f"the self-rollout takes one k for the whole batch (an int or a (1,) tensor), "
                             f"got shape {tuple(k.shape)}")
        k = int(k)
    if not 0 <= k < num_t:
        raise ValueError(f"self-rollout k must lie in [0, {num_t}) (an index into the student t list), got {k}")
    return k


def self_rollout_x0(
    student,
    text: torch.Tensor,
    lq_latent: torch.Tensor,
    degrade_sigma: torch.Tensor,
    noise: torch.Tensor,
    k: int | torch.Tensor,
    rollout_noise: torch.Tensor | None = None,
    t_list: Sequence[float] = STUDENT_INPUT_T,
    sample_type: str = "sde",
) -> torch.Tensor:
    """The student's x0 at ``t_list[k]`` after a k-step self-rollout from pure ``noise`` (spec §12, PDM 627-730).

    Steps ``0 .. k-1`` are the 4-step sampler's (at ``t_list[i]``): "sde" re-noises the x0 prediction to
    ``t_list[i+1]`` with ``rollout_noise[i]`` ((k, B, 3, H, W)), "ode" takes the Euler step
    ``x + (t_list[i+1] - t_list[i]) v`` (no noise, ``rollout_noise`` None). Step k is one more forward whose x0
    is returned; with k = 0 that is the pure-noise input at ``t_list[0]`` (no trace of the real image, unlike
    teacher forcing at 0.999).

    Gradient: only step k carries it (when grad mode is on), into the student's weights; in the student step both
    the VSD and the GAN term reach the student through that one forward. The k rollout steps run under no_grad
    and the input of step k is detached (as in the reference, PDM 627-730): the rollout only supplies the state
    distribution the sampler will meet at inference, and backpropagating through it would hold k more forwards'
    activations for a gradient through the sampler's own trajectory that the method does not use. The critic
    step calls this under no_grad (no gradient anywhere). ``k`` is one int for the whole batch (the reference
    draws one per context-parallel group). -> (B, 3, H, W) float32.
    """
    if sample_type not in SAMPLE_TYPES:
        raise ValueError(f"sample_type must be one of {SAMPLE_TYPES}, got {sample_type!r}")
    steps = _rollout_steps(k, len(t_list))
    if sample_type == "sde":
        want = (steps, *noise.shape)
        if rollout_noise is None or tuple(rollout_noise.shape) != want:
            got = None if rollout_noise is None else tuple(rollout_noise.shape)
            raise ValueError(f"the sde self-rollout with k={steps} needs rollout_noise of shape {want}, got {got}")
    elif rollout_noise is not None:
        raise ValueError("the ode self-rollout draws no noise: pass rollout_noise=None")
    ts = torch.as_tensor(t_list, dtype=torch.float32, device=noise.device)  # (K,)
    B = noise.shape[0]
    x = noise
    with torch.no_grad():
        for i in range(steps):
            s, s_next = ts[i].expand(B), ts[i + 1].expand(B)  # (B,)
            v = velocity(student, x, TIMESCALE * s, text, lq_latent, degrade_sigma)
            if sample_type == "sde":
                x = noised(x0_from_velocity(x, s, v), s_next, rollout_noise[i])
            else:
                x = x + (ts[i + 1] - ts[i]) * v
    x, s = x.detach(), ts[steps].expand(B)  # (B,): with k = 0 the input is the noise itself
    v = velocity(student, x, TIMESCALE * s, text, lq_latent, degrade_sigma)
    return x0_from_velocity(x, s, v)


def student_x0(
    student, hq, text, lq_latent, degrade_sigma, k, noise, t_list, mode="teacher_forcing", rollout_noise=None,
    sample_type="sde",
) -> torch.Tensor:
    """The student sample both steps start from, built as ``mode`` says (see the module docstring)."""
    if mode == "teacher_forcing":
        return teacher_forcing_x0(student, hq, text, lq_latent, degrade_sigma, k, noise, t_list)
    return self_rollout_x0(student, text, lq_latent, degrade_sigma, noise, k, rollout_noise, t_list, sample_type)


def distill_student_losses(
    student,
    teacher,
    fake_score,
    discriminator: nn.Module | None,
    hq: torch.Tensor,
    lq_latent: torch.Tensor,
    text: torch.Tensor,
    degrade_sigma: torch.Tensor,
    null_text: torch.Tensor,
    *,
    k: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    caption_keep: torch.Tensor | None = None,
    empty_text: torch.Tensor | None = None,
    t_list: Sequence[float] = STUDENT_INPUT_T,
    cfg_scale: float = 3.0,
    vsd_weight: float = 1.0,
    gan_weight: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    student_input_mode: str = "teacher_forcing",
    rollout_noise: torch.Tensor | None = None,
    sample_type: str = "sde",
) -> dict[str, torch.Tensor]:
    """Generator (student) step: ``total = vsd_weight * vsd + gan_weight * gan_gen`` (spec §5).

    hq (B, 3, H, W) in [-1, 1]; text (B, T, Dt) caption embedding (``caption_keep`` (B,) bool replaces dropped
    captions by ``empty_text`` (1, T, Dt)); null_text (1 or B, T', Dt) the negative-prompt embedding of the
    teacher's CFG; ``gan_weight`` is the already warmed-up weight of this iteration (`gan_weight_at`).
    Gradients reach the student only: the fake score runs under no_grad, D is frozen during the call and the
    teacher must hold frozen weights. ``student_input_mode`` / ``rollout_noise`` / ``sample_type`` choose the
    student sample (`student_x0`; the self-rollout takes one ``k`` for the batch). Returns float scalars ``vsd``
    (float64), ``gan_gen``, ``total``.
    """
    _check_input_mode(student_input_mode, sample_type)
    text = _caption(text, caption_keep, empty_text)
    B = hq.shape[0]
    null = null_text.expand(B, *null_text.shape[1:]).to(text.dtype)
    tt = TIMESCALE * t
    use_gan = discriminator is not None
    with _autocast(hq.device, amp_dtype):
        x0_s = student_x0(student, hq, text, lq_latent, degrade_sigma, k, noise, t_list, student_input_mode,
                          rollout_noise, sample_type)
        # parity: without the GAN the perturbation starts from the detached student sample (spec §12).
        x_t = noised(x0_s if use_gan else x0_s.detach(), t, eps)
        if use_gan:
            v_c, feats = teacher.with_features(x_t, tt, text, lq_latent, degrade_sigma)
        else:
            with torch.no_grad():
                v_c = velocity(teacher, x_t, tt, text, lq_latent, degrade_sigma)
        with torch.no_grad():
            x_t_d = x_t.detach()
            v_u = velocity(teacher, x_t_d, tt, null, lq_latent, degrade_sigma)
            if amp_dtype is not None:  # parity: the reference's net outputs (and so the CFG) are in amp_dtype
                v_u, v_c_d = v_u.to(amp_dtype), v_c.detach().to(amp_dtype)
            else:
                v_c_d = v_c.detach()
            x0_teacher = x0_from_velocity(x_t_d, t, v_u + cfg_scale * (v_c_d - v_u))
            x0_fake = x0_from_velocity(x_t_d, t, velocity(fake_score, x_t_d, tt, text, lq_latent, degrade_sigma))
        vsd = vsd_loss(x0_s, x0_teacher, x0_fake)
        if use_gan:
            with frozen(discriminator):
                gan_gen = F.softplus(-discriminator(feats).float()).mean()
        else:
            gan_gen = torch.zeros((), device=hq.device)
    total = vsd_weight * vsd + gan_weight * gan_gen
    return {"vsd": vsd, "gan_gen": gan_gen, "total": total}


def distill_critic_losses(
    student,
    teacher,
    fake_score,
    discriminator: nn.Module | None,
    hq: torch.Tensor,
    lq_latent: torch.Tensor,
    text: torch.Tensor,
    degrade_sigma: torch.Tensor,
    *,
    k: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    r1_noise: torch.Tensor | None = None,
    caption_keep: torch.Tensor | None = None,
    empty_text: torch.Tensor | None = None,
    t_list: Sequence[float] = STUDENT_INPUT_T,
    dsm_weight: float = 1.0,
    r1_weight: float = 200.0,
    r1_alpha: float = 0.1,
    amp_dtype: torch.dtype | None = None,
    student_input_mode: str = "teacher_forcing",
    rollout_noise: torch.Tensor | None = None,
    sample_type: str = "sde",
) -> dict[str, torch.Tensor]:
    """Critic step: ``total = dsm_weight * dsm + disc + r1_weight * r1`` (spec §6).

    The student sample is drawn without grad; the discriminator's "real" sample is the HQ image noised with the
    same ``t`` and ``eps`` as the fake one; R1 compares D on the real features with D on the features of
    ``x_real + r1_alpha * r1_noise``. Gradients reach the fake score and D only. Returns float32 scalars
    ``dsm``, ``disc``, ``r1``, ``total`` (``disc``/``r1`` are 0 without a discriminator or with r1_weight 0).
    The student sample is built as in `distill_student_losses` (same ``student_input_mode``, its own draws).
    """
    _check_input_mode(student_input_mode, sample_type)
    text = _caption(text, caption_keep, empty_text)
    tt = TIMESCALE * t
    zero = torch.zeros((), device=hq.device)
    with _autocast(hq.device, amp_dtype):
        with torch.no_grad():
            x0_s = student_x0(student, hq, text, lq_latent, degrade_sigma, k, noise, t_list, student_input_mode,
                              rollout_noise, sample_type)
            x_t = noised(x0_s, t, eps)
        v_f = velocity(fake_score, x_t, tt, text, lq_latent, degrade_sigma)
        dsm = F.mse_loss(v_f.float(), eps - x0_s)
    disc, r1 = zero, zero
    if discriminator is not None:
        with torch.autocast(hq.device.type, enabled=False):
            x_real = noised(hq, t, eps)
            with torch.no_grad():
                f_fake = teacher.features(x_t, tt, text, lq_latent, degrade_sigma)
                f_real = teacher.features(x_real, tt, text, lq_latent, degrade_sigma)
            logit_real, logit_fake = discriminator(f_real), discriminator(f_fake)
            disc = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
            if r1_weight > 0:
                if r1_noise is None:
                    raise ValueError("r1_weight > 0 needs r1_noise (B, 3, H, W)")
                with torch.no_grad():
                    f_alpha = teacher.features(x_real + r1_alpha * r1_noise, tt, text, lq_latent, degrade_sigma)
                r1 = (logit_real - discriminator(f_alpha)).square().mean()
    total = dsm_weight * dsm + disc + r1_weight * r1
    return {"dsm": dsm, "disc": disc, "r1": r1, "total": total}
