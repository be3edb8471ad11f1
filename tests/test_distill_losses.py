"""DMD2 distillation losses, discriminator, feature tap and per-iteration mechanics (spec distillation.md)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from pid_decoder.training.discriminator import Discriminator, TeacherWithFeatures, optimal_groups
from pid_decoder.training.distill_losses import (
    STUDENT_INPUT_T,
    DistillDraws,
    distill_critic_losses,
    distill_student_losses,
    draw_randomness,
    perturbation_t,
    self_rollout_x0,
    teacher_forcing_x0,
    velocity,
    vsd_loss,
    x0_from_velocity,
)
from pid_decoder.training.distiller import (
    CRITIC,
    STUDENT,
    DistillNets,
    OptimSettings,
    build_optimizers,
    clip_gradients,
    distill_step,
    gan_weight_at,
    phase_of,
)

# ----------------------------------------------------------------------------- simple nets with known outputs


class ScaleNet(nn.Module):
    """v = a * x + c * mean(text) (a, c trainable scalars); records its calls."""

    def __init__(self, a: float, c: float = 0.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.c = nn.Parameter(torch.tensor(c))
        self.calls = []

    def forward_train(self, x, t, text, lq, sigma):
        self.calls.append(t.detach().clone())
        return self.a * x + self.c * text.mean(dim=(1, 2)).view(-1, 1, 1, 1), None


class SimpleTeacher:
    """v = b * x + mean(text); the 'feature' is x itself (one map); frozen (plain float b)."""

    def __init__(self, b: float) -> None:
        self.b = b

    def forward_train(self, x, t, text, lq, sigma):
        return self.b * x + text.mean(dim=(1, 2)).view(-1, 1, 1, 1), None

    def with_features(self, x, t, text, lq, sigma):
        return self.forward_train(x, t, text, lq, sigma)[0], [x]

    def features(self, x, t, text, lq, sigma):
        return [x]


class MeanDisc(nn.Module):
    """logit = w * mean(feature) + b0, shape (B, 1)."""

    def __init__(self, w: float, b0: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b0 = nn.Parameter(torch.tensor(b0))

    def forward(self, feats):
        return (self.w * feats[0].mean(dim=(1, 2, 3)) + self.b0)[:, None]


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- VSD


def test_vsd_loss_value_and_gradient_by_hand():
    x0_s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).requires_grad_(True)
    teacher = torch.tensor([0.0, 2.0, 3.0, 5.0]).view(1, 1, 2, 2)
    fake = torch.tensor([2.0, 2.0, 2.0, 2.0]).view(1, 1, 2, 2)
    loss = vsd_loss(x0_s, teacher, fake)
    w = 1.0 / (0.5 + 1e-6)  # mean |x0_s - teacher| = (1 + 0 + 0 + 1) / 4
    g = [2 * w, 0.0, -1 * w, -3 * w]  # (fake - teacher) * w
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.5 * sum(v * v for v in g) / 4, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(x0_s.grad.view(-1).double(), torch.tensor(g, dtype=torch.float64) / 4)


def test_vsd_loss_weight_is_per_sample_and_nan_gradients_are_zeroed():
    x0_s = torch.zeros(2, 1, 1, 2, requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0], [2.0, 2.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[2.0, float("nan")], [3.0, 3.0]]).view(2, 1, 1, 2)
    loss = vsd_loss(x0_s, teacher, fake)
    g = [1 / (1 + 1e-6), 0.0, 1 / (2 + 1e-6), 1 / (2 + 1e-6)]
    assert loss.item() == pytest.approx(0.5 * sum(v * v for v in g) / 4, rel=1e-12)
    loss.backward()
    assert torch.isfinite(x0_s.grad).all()


# ----------------------------------------------------------------------------- student step by hand


def _batch(B=2, H=4, W=4, T=3, Dt=2):
    g = torch.Generator().manual_seed(7)
    return {
        "hq": torch.rand(B, 3, H, W, generator=g) * 2 - 1,
        "lq_latent": torch.zeros(B, 1, 1, 1),
        "text": torch.randn(B, T, Dt, generator=g),
        "degrade_sigma": torch.zeros(B),
        "null_text": torch.randn(1, T, Dt, generator=g),
    }


def _draws(B=2, H=4, W=4, k=(0, 3), t=(0.3, 0.8)):
    g = torch.Generator().manual_seed(11)
    return DistillDraws(
        k=torch.tensor(k), noise=torch.randn(B, 3, H, W, generator=g), t=torch.tensor(t),
        eps=torch.randn(B, 3, H, W, generator=g), r1_noise=torch.randn(B, 3, H, W, generator=g),
    )


def test_student_losses_by_hand():
    b, d = _batch(), _draws()
    a, tb, fd, cfg, lam = 0.5, 0.7, -0.2, 3.0, 0.03
    G, T, Fk, D = ScaleNet(a), SimpleTeacher(tb), ScaleNet(fd), MeanDisc(0.4, 0.1)
    out = distill_student_losses(
        G, T, Fk, D, b["hq"], b["lq_latent"], b["text"], b["degrade_sigma"], b["null_text"],
        k=d.k, noise=d.noise, t=d.t, eps=d.eps, cfg_scale=cfg, gan_weight=lam,
    )
    # independent float64 evaluation of spec §5
    hq, noise, eps = b["hq"].double(), d.noise.double(), d.eps.double()
    s = torch.tensor([0.999, 0.342], dtype=torch.float64).view(2, 1, 1, 1)
    t = d.t.double().view(2, 1, 1, 1)
    x_in = (1 - s) * hq + s * noise
    x0_s = x_in - s * (a * x_in)
    x_t = (1 - t) * x0_s + t * eps
    m_c = b["text"].double().mean(dim=(1, 2)).view(2, 1, 1, 1)
    m_u = b["null_text"].double().mean()
    v_c, v_u = tb * x_t + m_c, tb * x_t + m_u
    x0_T = x_t - t * (v_u + cfg * (v_c - v_u))
    x0_F = x_t - t * (fd * x_t)
    w = 1 / ((x0_s - x0_T).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
    vsd = 0.5 * (((x0_F - x0_T) * w) ** 2).mean()
    logits = 0.4 * x_t.mean(dim=(1, 2, 3)) + 0.1
    gan = sum(_softplus(-float(v)) for v in logits) / 2
    assert out["vsd"].item() == pytest.approx(vsd.item(), rel=1e-5)
    assert out["gan_gen"].item() == pytest.approx(gan, rel=1e-5)
    assert out["total"].item() == pytest.approx(vsd.item() + lam * gan, rel=1e-5)
    # the nets see 1000 t: student at the t-list entries, fake score at the perturbation t
    torch.testing.assert_close(G.calls[0], torch.tensor([999.0, 342.0]))
    torch.testing.assert_close(Fk.calls[0], 1000 * d.t)


def test_student_losses_caption_dropout_uses_empty_text_and_cfg_uses_negative():
    b, d = _batch(), _draws()
    G, Fk = ScaleNet(0.5), ScaleNet(0.0)
    empty = torch.full((1, 3, 2), 5.0)
    keep = torch.tensor([True, False])
    kw = {"k": d.k, "noise": d.noise, "t": d.t, "eps": d.eps, "cfg_scale": 3.0}
    text = b["text"].clone()
    text[1] = 5.0
    ref = distill_student_losses(G, SimpleTeacher(0.7), Fk, None, b["hq"], b["lq_latent"], text,
                                 b["degrade_sigma"], b["null_text"], **kw)
    out = distill_student_losses(G, SimpleTeacher(0.7), Fk, None, b["hq"], b["lq_latent"], b["text"],
                                 b["degrade_sigma"], b["null_text"], caption_keep=keep, empty_text=empty, **kw)
    assert out["vsd"].item() == pytest.approx(ref["vsd"].item(), rel=1e-9)
    changed = distill_student_losses(G, SimpleTeacher(0.7), Fk, None, b["hq"], b["lq_latent"], text,
                                     b["degrade_sigma"], b["null_text"] + 1, **kw)
    assert changed["vsd"].item() != pytest.approx(ref["vsd"].item(), rel=1e-6)


# ----------------------------------------------------------------------------- critic step by hand


def test_critic_losses_by_hand():
    b, d = _batch(), _draws()
    a, fd, alpha, r1w = 0.5, -0.2, 0.1, 200.0
    G, T, Fk, D = ScaleNet(a), SimpleTeacher(0.7), ScaleNet(fd, 0.3), MeanDisc(0.4, 0.1)
    out = distill_critic_losses(
        G, T, Fk, D, b["hq"], b["lq_latent"], b["text"], b["degrade_sigma"],
        k=d.k, noise=d.noise, t=d.t, eps=d.eps, r1_noise=d.r1_noise, r1_weight=r1w, r1_alpha=alpha,
    )
    hq, noise, eps = b["hq"].double(), d.noise.double(), d.eps.double()
    s = torch.tensor([0.999, 0.342], dtype=torch.float64).view(2, 1, 1, 1)
    t = d.t.double().view(2, 1, 1, 1)
    x_in = (1 - s) * hq + s * noise
    x0_s = x_in - s * (a * x_in)
    x_t = (1 - t) * x0_s + t * eps
    v_f = fd * x_t + 0.3 * b["text"].double().mean(dim=(1, 2)).view(2, 1, 1, 1)
    dsm = ((v_f - (eps - x0_s)) ** 2).mean()
    x_real = (1 - t) * hq + t * eps  # same t AND eps as the fake sample
    lf = 0.4 * x_t.mean(dim=(1, 2, 3)) + 0.1
    lr = 0.4 * x_real.mean(dim=(1, 2, 3)) + 0.1
    la = 0.4 * (x_real + alpha * d.r1_noise.double()).mean(dim=(1, 2, 3)) + 0.1
    disc = sum(_softplus(float(v)) for v in lf) / 2 + sum(_softplus(-float(v)) for v in lr) / 2
    r1 = ((lr - la) ** 2).mean().item()
    assert out["dsm"].item() == pytest.approx(dsm.item(), rel=1e-5)
    assert out["disc"].item() == pytest.approx(disc, rel=1e-5)
    assert out["r1"].item() == pytest.approx(r1, rel=1e-4)
    assert out["total"].item() == pytest.approx(dsm.item() + disc + r1w * r1, rel=1e-4)


def test_randomness_helpers():
    assert perturbation_t(torch.tensor([-10.0, 0.0, 10.0])).tolist() == pytest.approx([0.02, 0.5, 0.99])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = draw_randomness(g1, (2, 3, 4, 4), critic=True)
    b = draw_randomness(g2, (2, 3, 4, 4), critic=False)
    torch.testing.assert_close(a.noise, b.noise)  # same order: the critic only appends the R1 noise
    torch.testing.assert_close(a.eps, b.eps)
    assert b.r1_noise is None and a.r1_noise.shape == (2, 3, 4, 4)
    assert a.k.dtype == torch.int64 and 0 <= a.k.min() and a.k.max() <= 3
    assert ((a.t >= 0.02) & (a.t <= 0.99)).all()


# ----------------------------------------------------------------------------- discriminator and tap


def test_discriminator_head_matches_reference_layout():
    assert [optimal_groups(c) for c in (768, 100, 97, 12)] == [32, 25, 1, 3]
    with torch.device("meta"):
        d = Discriminator(1536, feature_indices={7, 20}, num_blocks=14)
    assert d.indices == (7,)
    assert sorted(d.state_dict()) == sorted(
        f"cls_pred_heads.0.{i}.{n}" for i in (0, 1, 3) for n in ("weight", "bias")
    )
    assert sum(p.numel() for p in d.parameters()) == 18_877_441
    small = Discriminator(8, feature_indices=(1,), num_blocks=2)
    assert small([torch.randn(3, 8, 4, 6)]).shape == (3, 1)
    with pytest.raises(ValueError, match="no usable feature index"):
        Discriminator(8, feature_indices=(5,), num_blocks=2)


def test_feature_tap_reads_block_output_and_early_exit_matches(tiny_net, tiny_config):
    net = tiny_net
    teacher = TeacherWithFeatures(net, (0,))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g)
    t = torch.tensor([500.0])
    text = torch.randn(1, 4, tiny_config.txt_embed_dim, generator=g)
    lq = torch.randn(1, 16, 1, 1, generator=g)
    sigma = torch.tensor([0.2])
    seen, later = [], []
    hooks = [net.patch_blocks[0].register_forward_hook(lambda m, a, o: seen.append(o[0].clone())),
             net.patch_blocks[1].register_forward_hook(lambda m, a, o: later.append(1))]
    try:
        with torch.no_grad():
            v, feats = teacher.with_features(x, t, text, lq, sigma)
            early = teacher.features(x, t, text, lq, sigma)
            assert len(later) == 1  # the early path stopped after block 0
            plain = net(x, t, text, lq, sigma)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(v, plain)  # the tap does not change the output
    assert feats[0].shape == (1, tiny_config.hidden_size, 2, 2)
    torch.testing.assert_close(feats[0], seen[0].view(1, 2, 2, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(early[0], feats[0])
    with torch.no_grad():  # outside a capture the tap records nothing
        net(x, t, text, lq, sigma)
    assert len(teacher.tap._out) == 1
    teacher.tap.remove()


# ----------------------------------------------------------------------------- gradient routing on tiny PiDNets


@pytest.fixture()
def tiny_setup(tiny_config):
    from pid_decoder import PiDNet

    torch.manual_seed(5)
    teacher_net = PiDNet(tiny_config).requires_grad_(False)
    student, fake = PiDNet(tiny_config), PiDNet(tiny_config)
    student.load_state_dict(teacher_net.state_dict())
    fake.load_state_dict(teacher_net.state_dict())
    disc = Discriminator(tiny_config.hidden_size, feature_indices=(1,), num_blocks=tiny_config.patch_depth)
    g = torch.Generator().manual_seed(9)
    batch = {
        "hq": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
        "lq_latent": torch.randn(1, 16, 1, 1, generator=g),
        "text": torch.randn(1, 4, tiny_config.txt_embed_dim, generator=g),
        "degrade_sigma": torch.tensor([0.3]),
    }
    null = torch.randn(1, 4, tiny_config.txt_embed_dim, generator=g)
    return student, TeacherWithFeatures(teacher_net, disc.indices), fake, disc, batch, null


def _with_grad(module):
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_student_update_trains_only_the_student(tiny_setup):
    G, T, Fk, D, batch, null = tiny_setup
    G.requires_grad_(True)
    Fk.requires_grad_(True)
    d = draw_randomness(torch.Generator().manual_seed(1), (1, 3, 32, 32))
    out = distill_student_losses(G, T, Fk, D, **batch, null_text=null, k=d.k, noise=d.noise, t=d.t, eps=d.eps,
                                 gan_weight=0.05)
    out["total"].backward()
    assert _with_grad(G)  # VSD and GAN paths reach the student
    assert not _with_grad(Fk) and not _with_grad(T.net) and not _with_grad(D)
    assert all(p.requires_grad for p in D.parameters())  # D's flags restored after the call
    # the GAN term alone reaches the student through the frozen teacher's first blocks
    G.zero_grad(set_to_none=True)
    gan_only = distill_student_losses(G, T, Fk, D, **batch, null_text=null, k=d.k, noise=d.noise, t=d.t,
                                      eps=d.eps, vsd_weight=0.0, gan_weight=1.0)
    gan_only["total"].backward()
    assert _with_grad(G) and not _with_grad(D)


def test_critic_update_trains_only_fake_score_and_discriminator(tiny_setup):
    G, T, Fk, D, batch, _null = tiny_setup
    G.requires_grad_(True)
    Fk.requires_grad_(True)
    d = draw_randomness(torch.Generator().manual_seed(2), (1, 3, 32, 32), critic=True)
    out = distill_critic_losses(G, T, Fk, D, **batch, k=d.k, noise=d.noise, t=d.t, eps=d.eps, r1_noise=d.r1_noise)
    out["total"].backward()
    assert _with_grad(Fk) and _with_grad(D) == {n for n, _ in D.named_parameters()}
    assert not _with_grad(G) and not _with_grad(T.net)
    assert set(out) == {"dsm", "disc", "r1", "total"} and all(torch.isfinite(v) for v in out.values())


# ----------------------------------------------------------------------------- self-rollout student input


class RecordingNet(ScaleNet):
    """ScaleNet that also records, per call, its input and whether grad mode was on."""

    def __init__(self, a: float, c: float = 0.0) -> None:
        super().__init__(a, c)
        self.inputs, self.grad_mode = [], []

    def forward_train(self, x, t, text, lq, sigma):
        self.inputs.append(x.detach().clone())
        self.grad_mode.append(torch.is_grad_enabled())
        return super().forward_train(x, t, text, lq, sigma)


def _rollout_by_hand(a, noise, steps_noise, k, mode):
    """float64 rollout of v = a x: k sampler steps on the t list, then x0 = x - t_k v at t_k."""
    ts = [float(torch.tensor(t, dtype=torch.float32)) for t in STUDENT_INPUT_T]
    x = noise.double()
    for i in range(k):
        v = a * x
        x = (1 - ts[i + 1]) * (x - ts[i] * v) + ts[i + 1] * steps_noise[i].double() if mode == "sde" else (
            x + (ts[i + 1] - ts[i]) * v)
    return x, x - ts[k] * a * x  # (input of step k, its x0)


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_self_rollout_by_hand_and_gradient_only_through_the_last_forward(mode):
    b, d = _batch(), _draws()
    k, a = 2, 0.5
    g = torch.Generator().manual_seed(3)
    steps_noise = torch.randn(k, 2, 3, 4, 4, generator=g) if mode == "sde" else None
    G = RecordingNet(a)
    out = self_rollout_x0(G, b["text"], b["lq_latent"], b["degrade_sigma"], d.noise, k, steps_noise,
                          sample_type=mode)
    x_k, want = _rollout_by_hand(a, d.noise, steps_noise, k, mode)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(G.calls), torch.tensor([[999.0] * 2, [866.0] * 2, [634.0] * 2]))
    assert G.grad_mode == [False, False, True]  # the k rollout steps run without grad
    out.sum().backward()
    # d out / d a = -t_k x_k with x_k a constant: any backpropagation through the rollout would add terms
    assert G.a.grad.item() == pytest.approx(float(-0.634 * x_k.sum()), rel=1e-5)


def test_self_rollout_k0_is_the_pure_noise_input():
    b, d = _batch(), _draws()
    G = ScaleNet(0.5, 0.2)
    args = (b["text"], b["lq_latent"], b["degrade_sigma"])
    empty = d.noise.new_empty((0, *d.noise.shape))
    out = self_rollout_x0(G, *args, d.noise, torch.tensor([0]), empty)
    s = torch.full((2,), STUDENT_INPUT_T[0])
    torch.testing.assert_close(out, x0_from_velocity(d.noise, s, velocity(G, d.noise, 1000 * s, *args)), rtol=0,
                               atol=0)
    torch.testing.assert_close(self_rollout_x0(G, *args, d.noise, 0, sample_type="ode"), out, rtol=0, atol=0)
    forced = teacher_forcing_x0(G, b["hq"], *args, torch.tensor([0, 0]), d.noise, STUDENT_INPUT_T)
    assert not torch.allclose(forced, out)  # teacher forcing at 0.999 keeps 0.001 of the real image


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_self_rollout_last_k_is_the_four_step_sampler(tiny_net, tiny_config, mode):
    """k = 3 rolls out the released sampler's first three steps: its x0 is the 4-step sample (unclamped)."""
    from pid_decoder.sampling import student_loop

    g = torch.Generator().manual_seed(2)
    B, H, W = 2, 32, 32
    noise = torch.randn(B, 3, H, W, generator=g)
    steps_noise = torch.randn(3, B, 3, H, W, generator=g)
    cond = (torch.randn(B, 4, tiny_config.txt_embed_dim, generator=g), torch.randn(B, 16, 1, 1, generator=g),
            torch.tensor([0.1, 0.4]))
    with torch.no_grad():
        got = self_rollout_x0(tiny_net, *cond, noise, 3, steps_noise if mode == "sde" else None, sample_type=mode)
        want = student_loop(lambda x, t: tiny_net.forward_train(x, t, *cond)[0], noise, 4, mode=mode,
                            step_noise=list(steps_noise), clamp=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_self_rollout_input_errors():
    b, d = _batch(), _draws()
    args = (ScaleNet(0.5), b["text"], b["lq_latent"], b["degrade_sigma"], d.noise)
    with pytest.raises(ValueError, match="one k for the whole batch"):
        self_rollout_x0(*args, torch.tensor([1, 2]), torch.zeros(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"k must lie in \[0, 4\)"):
        self_rollout_x0(*args, 4, sample_type="ode")
    with pytest.raises(ValueError, match=r"needs rollout_noise of shape \(2, 2, 3, 4, 4\), got \(1, 2, 3, 4, 4\)"):
        self_rollout_x0(*args, 2, torch.zeros(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="ode self-rollout draws no noise"):
        self_rollout_x0(*args, 1, torch.zeros(1, 2, 3, 4, 4), sample_type="ode")
    with pytest.raises(ValueError, match="student_input_mode must be one of"):
        distill_critic_losses(ScaleNet(0.5), SimpleTeacher(0.7), ScaleNet(0.0), None, b["hq"], b["lq_latent"],
                              b["text"], b["degrade_sigma"], k=d.k, noise=d.noise, t=d.t, eps=d.eps,
                              student_input_mode="rollout")


def test_rollout_randomness_order_and_rows():
    shape = (4, 3, 4, 4)
    for seed in range(6):  # several seeds: k = 0 (no re-noising draws) and k > 0 both occur
        d = draw_randomness(torch.Generator().manual_seed(seed), shape, critic=True,
                            student_input_mode="pidself_rollout")
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(shape, generator=g)
        k = torch.randint(0, 4, (1,), generator=g)
        steps = [torch.randn(shape, generator=g) for _ in range(int(k))]
        t = perturbation_t(torch.randn(4, generator=g))
        eps, r1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        assert d.k.shape == (1,) and torch.equal(d.k, k) and d.rollout_noise.shape == (int(k), *shape)
        for got, want in ((d.noise, noise), (d.t, t), (d.eps, eps), (d.r1_noise, r1)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        if steps:
            torch.testing.assert_close(d.rollout_noise, torch.stack(steps), rtol=0, atol=0)
        part = draw_randomness(torch.Generator().manual_seed(seed), shape, rows=slice(2, 4),
                               student_input_mode="pidself_rollout")
        assert torch.equal(part.k, d.k)  # one k for the global batch, every rank's rows re-noised alike
        torch.testing.assert_close(part.rollout_noise, d.rollout_noise[:, 2:4], rtol=0, atol=0)
        ode = draw_randomness(torch.Generator().manual_seed(seed), shape, student_input_mode="pidself_rollout",
                              sample_type="ode")
        assert ode.rollout_noise is None and torch.equal(ode.k, k)
        g = torch.Generator().manual_seed(seed)  # the ode rollout draws nothing between k and t
        torch.randn(shape, generator=g), torch.randint(0, 4, (1,), generator=g)
        torch.testing.assert_close(ode.t, perturbation_t(torch.randn(4, generator=g)), rtol=0, atol=0)


def _rollout_draws(seed, shape, k, critic=False, sample_type="sde"):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(k, *shape, generator=g)
    return {"k": torch.tensor([k]), "noise": torch.randn(shape, generator=g), "t": torch.tensor([0.4]),
            "rollout_noise": steps if sample_type == "sde" else None, "sample_type": sample_type,
            "eps": torch.randn(shape, generator=g), "student_input_mode": "pidself_rollout",
            **({"r1_noise": torch.randn(shape, generator=g)} if critic else {})}


@pytest.mark.parametrize("k", [0, 2])
def test_rollout_student_step_trains_only_the_student_through_its_last_forward(tiny_setup, k):
    G, T, Fk, D, batch, null = tiny_setup
    G.requires_grad_(True)
    Fk.requires_grad_(True)
    draws = _rollout_draws(3, (1, 3, 32, 32), k)
    grad_flags = []
    orig = G.forward_train
    G.forward_train = lambda *a: (grad_flags.append(torch.is_grad_enabled()), orig(*a))[1]
    try:
        out = distill_student_losses(G, T, Fk, D, **batch, null_text=null, **draws, gan_weight=0.05)
        out["total"].backward()
        assert grad_flags == [False] * k + [True]  # k rollout forwards without grad, then the one with grad
        assert _with_grad(G) and not _with_grad(Fk) and not _with_grad(T.net) and not _with_grad(D)
        G.zero_grad(set_to_none=True)
        gan_only = distill_student_losses(G, T, Fk, D, **batch, null_text=null, **draws, vsd_weight=0.0,
                                          gan_weight=1.0)
        gan_only["total"].backward()
        assert _with_grad(G) and not _with_grad(D)  # the GAN term reaches the student through step k too
        G.zero_grad(set_to_none=True)
        again = distill_student_losses(G, T, Fk, D, **batch, null_text=null, **draws, gan_weight=0.05)
        assert all(torch.equal(again[n], out[n]) for n in out)  # pinned draws: the same numbers
    finally:
        G.forward_train = orig


@pytest.mark.parametrize("sample_type", ["sde", "ode"])
def test_rollout_critic_step_trains_only_fake_score_and_discriminator(tiny_setup, sample_type):
    G, T, Fk, D, batch, _null = tiny_setup
    G.requires_grad_(True)
    Fk.requires_grad_(True)
    draws = _rollout_draws(4, (1, 3, 32, 32), 2, critic=True, sample_type=sample_type)
    out = distill_critic_losses(G, T, Fk, D, **batch, **draws)
    out["total"].backward()
    assert _with_grad(Fk) and _with_grad(D) == {n for n, _ in D.named_parameters()}
    assert not _with_grad(G) and not _with_grad(T.net)
    forced = distill_critic_losses(G, T, Fk, D, **batch, **{**draws, "student_input_mode": "teacher_forcing",
                                                            "k": torch.tensor([2]), "rollout_noise": None})
    assert forced["dsm"].item() != pytest.approx(out["dsm"].item(), rel=1e-4)  # the mode changes the sample
    if sample_type == "sde":
        other = distill_critic_losses(G, T, Fk, D, **batch, **{**draws, "rollout_noise": -draws["rollout_noise"]})
        assert other["dsm"].item() != pytest.approx(out["dsm"].item(), rel=1e-4)  # the re-noising is used
    else:
        sde = distill_critic_losses(G, T, Fk, D, **batch, **_rollout_draws(4, (1, 3, 32, 32), 2, critic=True))
        assert sde["dsm"].item() != pytest.approx(out["dsm"].item(), rel=1e-4)  # the ode step is not the sde one


# ----------------------------------------------------------------------------- schedule mechanics


def test_phase_warmups_and_lr_factor():
    assert [phase_of(i, 6) for i in range(13)] == [STUDENT] + [CRITIC] * 5 + [STUDENT] + [CRITIC] * 5 + [STUDENT]
    assert gan_weight_at(0, 0.05, 100) == 0.0
    assert gan_weight_at(6, 0.05, 100) == pytest.approx(0.003)
    assert gan_weight_at(96, 0.05, 100) == pytest.approx(0.048)
    assert gan_weight_at(102, 0.05, 100) == 0.05
    G, F_ = nn.Linear(2, 1), nn.Linear(2, 1)
    opts, scheds = build_optimizers(G, F_, None, OptimSettings())
    factor = scheds["net"].lr_lambdas[0]  # LambdaLinear over student updates: 1e-11 at update 0 (spec Q1)
    assert factor(0) == 1e-6 and opts["net"].param_groups[0]["lr"] == pytest.approx(1e-11)
    assert factor(50) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5) and factor(100) == 1.0 and factor(600) == 1.0
    assert [o.defaults["weight_decay"] for o in opts.values()] == [0.0, 1e-3]
    assert set(opts) == {"net", "fake_score"}


def test_clip_zeroes_nan_and_clips_student_and_fake_separately_not_discriminator():
    G, Fk, D = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    G.weight.grad = torch.tensor([[3.0, 4.0]])
    Fk.weight.grad = torch.tensor([[float("nan"), 1.0]])
    D.weight.grad = torch.tensor([[30.0, float("inf")]])
    norm, fake_norm = clip_gradients(G, Fk, D, 0.1)
    assert norm.item() == pytest.approx(5.0) and fake_norm.item() == pytest.approx(1.0)
    torch.testing.assert_close(G.weight.grad, torch.tensor([[0.06, 0.08]]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Fk.weight.grad, torch.tensor([[0.0, 0.1]]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(D.weight.grad, torch.tensor([[30.0, 0.0]]))


def test_alternation_order_over_two_cycles(tiny_setup):
    G, T, Fk, D, batch, null = tiny_setup
    freq = 3
    nets = DistillNets(G, T, Fk, D, null, student_update_freq=freq, gan_warmup=2)
    opts, scheds = build_optimizers(G, Fk, D, OptimSettings(student_warmup=2))
    stepped, ema_calls = [], []
    for name, opt in opts.items():
        opt.register_step_post_hook(lambda o, a, kw, name=name: stepped.append(name))
    before = {n: {k: p.detach().clone() for k, p in m.named_parameters()} for n, m in
              (("net", G), ("fake_score", Fk), ("discriminator", D))}
    g = torch.Generator().manual_seed(4)
    log = []
    for it in range(2 * freq):
        stepped.clear()
        d = draw_randomness(g, (1, 3, 32, 32), critic=phase_of(it, freq) == CRITIC)
        losses = distill_step(nets, opts, scheds, ema_calls.append, batch, d, it)
        log.append((it, tuple(stepped), sorted(losses)))
    assert [s for _, s, _ in log] == [
        ("net",), ("fake_score", "discriminator"), ("fake_score", "discriminator"),
        ("net",), ("fake_score", "discriminator"), ("fake_score", "discriminator"),
    ]
    assert log[0][2] == ["fake_grad_norm", "gan_gen", "grad_norm", "total", "vsd"]
    assert log[1][2] == ["disc", "dsm", "fake_grad_norm", "grad_norm", "r1", "total"]
    assert ema_calls == [0, 1]  # the EMA sees the student-update index, only on student iterations
    # the student scheduler counted student updates only: 2 updates -> factor f(2) = 1 (warm-up 2)
    assert scheds["net"].last_epoch == 2 and set(scheds) == {"net"}
    assert opts["net"].param_groups[0]["lr"] == pytest.approx(1e-5)
    for name, m in (("net", G), ("fake_score", Fk), ("discriminator", D)):
        assert any(not torch.equal(p, before[name][k]) for k, p in m.named_parameters()), name
    assert all(p.grad is None for m in (G, Fk, D) for p in m.parameters())


# ----------------------------------------------------------------------------- released recipe configs


@pytest.mark.parametrize("family", ["flux", "flux2", "qwenimage"])
@pytest.mark.parametrize("res", ["2048", "3840"])
def test_released_recipe_configs(family, res):
    from pathlib import Path

    from pid_decoder.training.config import ConfigError, load_config
    from pid_decoder.training.distiller import check_distill_config, student_net_config

    path = Path(__file__).resolve().parents[1] / "configs" / "distill" / f"distill-{family}-{res}.toml"
    cfg = load_config(path)
    d = cfg.distill
    assert (d.student_update_freq, d.sample_steps, d.teacher_cfg_scale, d.t_clamp) == (6, 4, 3.0, (0.02, 0.99))
    assert d.t_list == (0.999, 0.866, 0.634, 0.342, 0.0) and d.feature_indices == (7,)
    assert (d.gan_weight, d.gan_warmup, d.r1_weight, d.r1_alpha) == (0.05, 100, 200.0, 0.1)
    assert (d.fake_score_lr, d.fake_score_weight_decay, d.discriminator_lr, d.discriminator_weight_decay) == (
        1e-5, 1e-3, 1e-5, 0.0)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, cfg.optim.warmup_start) == (1e-5, 0.0, 100, 1e-6)
    assert (cfg.optim.grad_clip, cfg.ema.rate, cfg.run.max_steps, cfg.data.batch_size) == (0.1, 0.1, 3000, 1)
    assert (cfg.conditioning.caption_dropout, cfg.conditioning.lq_dropout, cfg.conditioning.noise_prob) == (0.1, 0.0, 0.75)
    assert cfg.conditioning.backbone == family and f"official_{family}_undistilled" in d.teacher
    net = student_net_config(cfg)
    assert net.lq.aux_rgb_head is False and net.lq.latent_channels == (128 if family == "flux2" else 16)
    with pytest.raises(ConfigError, match="distill.teacher not found"):  # the only problem: no weights here
        check_distill_config(cfg)


# ----------------------------------------------------------------------------- DMD mechanics on a Gaussian toy


def _posterior_x0(x_t, t, mean, std):
    """E[x0 | x_t] for x0 ~ N(mean, std^2) per pixel and x_t = (1 - t) x0 + t eps."""
    t = t.view(-1, 1, 1, 1)
    var = std**2
    return mean + (1 - t) * var / ((1 - t) ** 2 * var + t**2) * (x_t - (1 - t) * mean)


class GaussianScore(nn.Module):
    """The exact velocity of a per-pixel Gaussian N(mean, std^2); trainable (fake score) or fixed (teacher)."""

    def __init__(self, mean: float, std: float, trainable: bool) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mean), requires_grad=trainable)
        self.log_std = nn.Parameter(torch.tensor(std).log(), requires_grad=trainable)

    def forward_train(self, x, t1000, text, lq, sigma):
        t = t1000 / 1000
        return (x - _posterior_x0(x, t, self.mean, self.log_std.exp())) / t.view(-1, 1, 1, 1), None

    def with_features(self, *args):
        return self.forward_train(*args)[0], []


class AffineStudent(nn.Module):
    """x0 = scale * x_in + shift: from near-pure noise a Gaussian N(shift, scale^2) generator."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.shift = nn.Parameter(torch.tensor(-0.5))

    def forward_train(self, x, t1000, text, lq, sigma):
        t = (t1000 / 1000).view(-1, 1, 1, 1)
        return (x - (self.scale * x + self.shift)) / t, None


def test_dmd_moves_a_gaussian_student_to_the_teacher_distribution():
    """Student (VSD) and fake score (DSM) alternate as in the loop, with exact Gaussian scores for teacher and fake
    score: the student's one-step samples from pure noise must move from N(-0.5, 1) to the teacher's N(0.5, 0.2^2)
    (a wrong sign or weight in the VSD/DSM gradients makes the mean diverge instead)."""
    torch.manual_seed(0)
    teacher = GaussianScore(0.5, 0.2, trainable=False)
    fake = GaussianScore(0.5, 0.2, trainable=True)  # initialised from the teacher, as in the recipe
    student = AffineStudent()
    nets = DistillNets(student, teacher, fake, None, torch.zeros(1, 1, 1), student_update_freq=2, t_list=(0.999,),
                       cfg_scale=1.0, clip_norm=1e9)
    s = OptimSettings(student_lr=2e-2, student_warmup=0, fake_score_lr=5e-2, fake_score_weight_decay=0.0)
    opts, scheds = build_optimizers(student, fake, None, s)
    g = torch.Generator().manual_seed(1)
    shape = (8, 3, 4, 4)
    start = (student.shift.item(), student.scale.item())
    for it in range(1200):
        hq = 0.5 + 0.2 * torch.randn(shape, generator=g)  # real data (used by the critic's D only; D is off)
        batch = {"hq": hq, "lq_latent": torch.zeros(8, 1, 1, 1), "text": torch.zeros(8, 1, 1),
                     "degrade_sigma": torch.zeros(8)}
        d = draw_randomness(g, shape, num_t=1, critic=phase_of(it, 2) == CRITIC)
        distill_step(nets, opts, scheds, None, batch, d, it)
    end = (student.shift.item(), abs(student.scale.item()))
    assert abs(end[0] - 0.5) < 0.1 * abs(start[0] - 0.5), (start, end)  # mean -0.5 -> ~0.5
    # the spread oscillates around the target while the fake score lags (DMD's variance dynamics): only its
    # direction is asserted
    assert abs(end[1] - 0.2) < 0.75 * abs(start[1] - 0.2), (start, end)  # std 1 -> towards 0.2
    assert abs(fake.mean.item() - end[0]) < 0.2  # the fake score tracks the student's distribution


@pytest.mark.parametrize(("override", "message"), [
    ("distill.t_list=[0.9, 0.5, 0.0]", "distill.t_list must be the student sampler's list"),
    ("model.aux_rgb_head=true", "set model.aux_rgb_head = false"),
    ('model.trainable="fix_backbone"', 'set model.trainable = "full"'),
    ("distill.t_clamp=[0.5, 0.2]", "distill.t_clamp must satisfy"),
    ("distill.feature_indices=[5]", "name no block of the 2-block net"),
])
def test_distill_config_errors(override, message, tmp_path):
    from pathlib import Path

    from pid_decoder.training.config import ConfigError, load_config
    from pid_decoder.training.distiller import check_distill_config

    config = Path(__file__).resolve().parents[1] / "configs" / "distill" / "tiny-cpu.toml"
    cfg = load_config(config, [f'distill.teacher="{tmp_path}"', override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_distill_config(cfg)
    check_distill_config(load_config(config, [f'distill.teacher="{tmp_path}"']))  # the tiny config itself is fine
