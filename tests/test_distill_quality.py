"""The student step on a real tiny PiDNet: the conventions it shares with the samplers, and the direction one
update moves the student. (Whether a whole tiny distillation brings the student closer to its teacher is measured by
bench/distill_quality.py, not asserted: on CPU-sized models it does not reliably, see docs/distillation.md.)"""

from __future__ import annotations

import copy

import pytest
import torch

from pid_decoder.training.distill_losses import (
    STUDENT_INPUT_T,
    DistillDraws,
    noised,
    teacher_forcing_x0,
    velocity,
    x0_from_velocity,
)
from pid_decoder.training.distiller import DistillNets, OptimSettings, build_optimizers, distill_step


def _problem(tiny_config, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "hq": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
        "lq_latent": torch.randn(1, 16, 1, 1, generator=g),
        "text": torch.randn(1, 4, tiny_config.txt_embed_dim, generator=g),
        "degrade_sigma": torch.tensor([0.3]),
    }
    draws = DistillDraws(k=torch.tensor([1]), noise=torch.randn(1, 3, 32, 32, generator=g), t=torch.tensor([0.5]),
                         eps=torch.randn(1, 3, 32, 32, generator=g))
    return batch, draws


def test_training_call_is_the_sampler_call(tiny_net):
    """The losses call nets as forward_train(x, 1000 t, ...); the samplers as denoise(x, 1000 t, prepare(...))."""
    g = torch.Generator().manual_seed(0)
    x, z, text = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 16, 1, 1, generator=g), torch.randn(2, 4, 24)
    t1000, sigma = torch.tensor([700.0, 200.0]), torch.tensor([0.3, 0.0])
    with torch.no_grad():
        v_train = tiny_net.forward_train(x, t1000, text, z, sigma)[0]
        v_sample = tiny_net.denoise(x, t1000, tiny_net.prepare(text, z, sigma, 32, 32))
    torch.testing.assert_close(v_train, v_sample, rtol=0, atol=1e-6)


def test_teacher_forcing_input_k_is_the_student_samplers_step_k(tiny_net):
    """The student is trained at the times its sampler visits (1000 t_list[k], float32) and its x0 is the sampler's
    x - t v, so the distilled weights are used at inference exactly where they were trained."""
    from pid_decoder.sampling import _x0_from_velocity, student_loop

    g = torch.Generator().manual_seed(1)
    hq, z, text = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(1, 16, 1, 1, generator=g), torch.randn(1, 4, 24)
    sigma, noise = torch.tensor([0.2]), torch.randn(1, 3, 32, 32, generator=g)
    cond = tiny_net.prepare(text, z, sigma, 32, 32)
    times = []
    with torch.no_grad():
        student_loop(lambda x, t: times.append(t) or tiny_net.denoise(x, t, cond), noise.clone(), 4,
                     generator=torch.Generator().manual_seed(2))
        for k, s in enumerate(STUDENT_INPUT_T):
            torch.testing.assert_close(times[k], torch.tensor([1000 * s], dtype=torch.float32), rtol=0, atol=0)
            x_in = noised(hq, torch.tensor([s]), noise)
            expected = _x0_from_velocity(x_in, torch.tensor(s), tiny_net.denoise(x_in, times[k], cond))
            got = teacher_forcing_x0(tiny_net, hq, text, z, sigma, torch.tensor([k]), noise, STUDENT_INPUT_T)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fake_equals_teacher", [True, False])
def test_one_student_update_moves_x0_from_the_fake_score_towards_the_teacher(tiny_config, fake_equals_teacher):
    """GAN off, one `distill_step` (AdamW, warm-up off): the student's x0 moves along x0_teacher - x0_fake (cosine
    > 0; a sign error in x0, CFG or VSD makes it negative); with fake score = teacher and CFG against the same text
    the VSD gradient is exactly 0 and the student does not move."""
    from pid_decoder import PiDNet

    torch.manual_seed(5)
    teacher = PiDNet(tiny_config).requires_grad_(False).eval()
    student, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    if fake_equals_teacher:
        teacher = fake  # the same module (a copy with other requires_grad flags may round differently, ~1e-6)
    else:
        with torch.no_grad():
            for p in fake.parameters():
                p.add_(0.05 * torch.randn_like(p))
    batch, d = _problem(tiny_config)
    null = batch["text"] if fake_equals_teacher else torch.zeros_like(batch["text"])
    nets = DistillNets(student, teacher, fake, None, null, cfg_scale=3.0, clip_norm=1e9)
    opts, scheds = build_optimizers(student, fake, None, OptimSettings(student_lr=1e-4, student_warmup=0))
    args = (batch["hq"], batch["text"], batch["lq_latent"], batch["degrade_sigma"], d.k, d.noise, STUDENT_INPUT_T)
    with torch.no_grad():
        x0_s = teacher_forcing_x0(student, *args)
        x_t = noised(x0_s, d.t, d.eps)
        tt = 1000 * d.t
        v_c = velocity(teacher, x_t, tt, batch["text"], batch["lq_latent"], batch["degrade_sigma"])
        v_u = velocity(teacher, x_t, tt, null, batch["lq_latent"], batch["degrade_sigma"])
        x0_teacher = x0_from_velocity(x_t, d.t, v_u + 3.0 * (v_c - v_u))
        x0_fake = x0_from_velocity(x_t, d.t, velocity(fake, x_t, tt, batch["text"], batch["lq_latent"],
                                                      batch["degrade_sigma"]))
    start = {n: p.clone() for n, p in student.named_parameters()}
    out = distill_step(nets, opts, scheds, None, batch, d, 0)
    with torch.no_grad():
        moved = teacher_forcing_x0(student, *args) - x0_s
    if fake_equals_teacher:
        assert float(out["vsd"].detach()) == 0.0 and float(out["grad_norm"]) == 0.0
        assert all(torch.equal(p, start[n]) for n, p in student.named_parameters())
    else:
        assert opts["net"].param_groups[0]["lr"] > 0 and float(out["grad_norm"]) > 0
        direction = x0_teacher - x0_fake
        cosine = float((moved * direction).sum() / (moved.norm() * direction.norm()))
        assert cosine > 0.1, cosine
