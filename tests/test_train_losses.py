"""Stage-0/1 training numerics: teacher losses and gradients against the reference, LQ downsample, shift,
power EMA, LR warm-up, trainable-parameter modes, and loading networks for training.

The conformance cases in tests/fixtures/train_golden were made by the reference's own loss code on the tiny
networks of tests/fixtures/golden (README there); they are a verbatim copy of the shared set.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pid_decoder import load_network
from pid_decoder.checkpoints import open_checkpoint, state_dict_for_release
from pid_decoder.config import NetConfig
from pid_decoder.sampling import dynamic_shift
from pid_decoder.training.degrade import downsample_lq, lq_size
from pid_decoder.training.losses import LossWeights, lq_align_loss, logit_normal, shift_t, teacher_losses
from pid_decoder.training.params import MODES, set_trainable, trainable_names
from pid_decoder.training.schedules import EMA, LambdaLinear, ema_beta, ema_gamma, ema_update_

from .conftest import FIXTURES, GOLDEN_DIR

TRAIN_GOLDEN = FIXTURES / "train_golden"
CASES = sorted(p.name for p in TRAIN_GOLDEN.iterdir() if (p / "meta.json").is_file())
V15 = [c for c in CASES if json.loads((TRAIN_GOLDEN / c / "meta.json").read_text())["aux_head"]]


def _config(name: str) -> NetConfig:
    cfg = json.loads((GOLDEN_DIR / name / "config.json").read_text())
    return NetConfig.from_reference(cfg["net"], pixeldit=cfg["kind"] == "pixeldit_t2i")


def _net(name: str, training: bool = True):
    return load_network(GOLDEN_DIR / name / "model_ema_bf16.pth", _config(name), training=training)


def _case(name: str) -> dict:
    from safetensors.torch import load_file

    folder = TRAIN_GOLDEN / name
    return {
        "meta": json.loads((folder / "meta.json").read_text()),
        # Clone: tensors straight from a safetensors loader can be unaligned, which perturbs low bits.
        "inputs": {k: v.clone() for k, v in load_file(folder / "inputs.safetensors").items()},
        "expected": load_file(folder / "expected.safetensors"),
    }


def _losses(net, case, **kw):
    inp = case["inputs"]
    return teacher_losses(
        net, inp["hq"], inp["lq_latent"], inp["text"], inp["degrade_sigma"],
        t=inp["t"], noise=inp["noise"], shift=case["meta"]["shift"], **kw,
    )


_results: dict = {}


def _golden_run(name: str):
    """Losses and parameter gradients of one case (computed once per case)."""
    if name not in _results:
        case, net = _case(name), _net(name)
        out = _losses(net, case)
        out["total"].backward()
        grads = {n: p.grad for n, p in net.named_parameters()}
        _results[name] = (case, {k: v.detach() for k, v in out.items()}, grads)
    return _results[name]


# --------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("name", CASES)
def test_golden_losses(name):
    case, out, _ = _golden_run(name)
    expected = case["expected"]
    keys = {"diffusion", "total"} | ({"lq_align"} if case["meta"]["aux_head"] else set())
    assert set(out) == keys
    for key in keys:
        assert out[key].shape == () and out[key].dtype == torch.float32
        assert abs(out[key].double().item() / expected[key].item() - 1) <= 1e-5, key


@pytest.mark.parametrize("name", CASES)
def test_golden_gradient_norms(name):
    case, _, grads = _golden_run(name)
    names = case["meta"]["grad_param_names"]
    assert set(names) | set(case["meta"]["params_without_grad"]) == set(grads)
    ours = torch.stack([grads[n].norm() if grads[n] is not None else torch.zeros(()) for n in names]).double()
    ref = case["expected"]["grad_norms"].double()
    # rel 1e-4, plus a floor of 1e-6 x the case's largest gradient norm: scalar gate parameters (log_alpha,
    # one-output biases) have gradients that are sums of many cancelling terms, and the reference's own float32
    # values differ from a float64 evaluation by up to 7e-4 relative there (measured; we are within 3e-7 x max).
    tol = 1e-4 * ref.abs() + 1e-6 * ref.max()
    bad = [f"{n}: {a:.6g} vs {b:.6g}" for n, a, b, t in zip(names, ours, ref, tol) if abs(a - b) > t]
    assert not bad, bad


@pytest.mark.parametrize("name", CASES)
def test_golden_params_without_grad(name):
    case, _, grads = _golden_run(name)
    assert case["meta"]["params_without_grad"]
    assert [n for n in case["meta"]["params_without_grad"] if grads[n] is not None] == []


@pytest.mark.parametrize("name", CASES)
def test_golden_lq_image(name):
    case = _case(name)
    lq = downsample_lq(case["inputs"]["hq"])
    torch.testing.assert_close(lq, case["expected"]["lq_image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", V15)
def test_explicit_lq_image_and_keep_equal_the_defaults(name):
    case, out, _ = _golden_run(name)
    inp = case["inputs"]
    keep = torch.tensor([True, False, True])
    assert torch.equal(inp["lq_latent"].flatten(1).ne(0).any(1), keep)  # sample 1 is the dropped LQ
    with torch.no_grad():
        again = _losses(_net(name), case, lq_image=case["expected"]["lq_image"], lq_keep=keep, validate=False)
        masked = _losses(_net(name), case, lq_keep=torch.tensor([False, False, True]))
    torch.testing.assert_close(again["lq_align"], out["lq_align"], rtol=1e-6, atol=0)
    assert masked["lq_align"] != out["lq_align"]


# --------------------------------------------------------------------------- the loss function
def test_stage0_pixeldit_loss_is_flow_matching_on_the_inference_forward():
    net = _net("pixeldit_t2i")
    g = torch.Generator().manual_seed(3)
    hq = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    noise = torch.randn(hq.shape, generator=g)
    text = torch.randn(2, 5, net.config.txt_embed_dim, generator=g)
    t = logit_normal(2, g)
    out = teacher_losses(net, hq, None, text, None, t=t, noise=noise, shift=2.0)
    assert set(out) == {"diffusion", "total"}
    ts = 2.0 * t / (1 + t)
    x_t = (1 - ts)[:, None, None, None] * hq + ts[:, None, None, None] * noise
    with torch.no_grad():
        v = net(x_t, 1000 * ts, text)
    expected = ((v - (noise - hq)) ** 2).mean()
    torch.testing.assert_close(out["total"].detach(), expected, rtol=1e-6, atol=0)
    out["total"].backward()
    assert net.s_embedder.proj.weight.grad is not None


def test_aux_loss_reaches_only_the_lq_trunk_and_aux_head():
    case, net = _case("v15_flux"), _net("v15_flux")
    _losses(net, case)["lq_align"].backward()
    reached = {n for n, p in net.named_parameters() if p.grad is not None}
    assert reached == {n for n, _ in net.named_parameters() if n.startswith(("lq_proj.latent_proj.", "lq_proj.lq_aux_rgb_head."))}


def test_forward_train_matches_the_inference_forward():
    case, net = _case("v15_flux2"), _net("v15_flux2")
    inp = case["inputs"]
    t = torch.full((3,), 500.0)
    with torch.no_grad():
        v, aux = net.forward_train(inp["noise"], t, inp["text"], inp["lq_latent"], inp["degrade_sigma"])
        ref = net(inp["noise"], t, inp["text"], inp["lq_latent"], inp["degrade_sigma"])
    assert torch.equal(v, ref)
    assert aux.shape == case["expected"]["lq_image"].shape


def test_inference_loaded_v15_network_is_refused():
    case, net = _case("v15_flux"), _net("v15_flux", training=False)
    with pytest.raises(ValueError, match="training=True"):
        _losses(net, case)


def test_bad_inputs_fail_with_a_message():
    case, net = _case("v1_flux"), _net("v1_flux")
    inp = case["inputs"]
    args = (net, inp["hq"], inp["lq_latent"], inp["text"], inp["degrade_sigma"])
    with pytest.raises(ValueError, match="noise must have the shape"):
        teacher_losses(*args, t=inp["t"], noise=inp["noise"][:, :, :32], shift=1.0)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        teacher_losses(*args, t=inp["t"] + 1, noise=inp["noise"], shift=1.0)
    with pytest.raises(ValueError, match="lq_latent must have shape"):
        teacher_losses(net, inp["hq"], inp["lq_latent"][:, :, :1], inp["text"], inp["degrade_sigma"],
                       t=inp["t"], noise=inp["noise"], shift=1.0)
    with pytest.raises(ValueError, match="NaN"):
        teacher_losses(net, inp["hq"] * float("nan"), *args[2:], t=inp["t"], noise=inp["noise"], shift=1.0)
    pixeldit = _net("pixeldit_t2i")
    with pytest.raises(ValueError, match="PixelDiT"):
        teacher_losses(pixeldit, inp["hq"], inp["lq_latent"], torch.zeros(3, 4, pixeldit.config.txt_embed_dim),
                       None, t=inp["t"], noise=inp["noise"], shift=1.0)


def test_alignment_loss_weighting_and_masking():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 3, 4, 4, generator=g)
    target = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    sigma = torch.tensor([0.0, 0.5, 1.0])
    keep = torch.ones(3, dtype=torch.bool)
    w = LossWeights()

    def per_sample(i):
        return lq_align_loss(pred[i:i + 1], target[i:i + 1], torch.zeros(1), keep[:1], w)

    # weights (1 - sigma): 1, 0.5, 0 -> (l0 + 0.5 l1) / 1.5
    expected = (per_sample(0) + 0.5 * per_sample(1)) / 1.5
    torch.testing.assert_close(lq_align_loss(pred, target, sigma, keep, w), expected)
    # a dropped condition and a black target are masked; everything masked gives exactly 0
    masked = lq_align_loss(pred, target, sigma, torch.tensor([False, True, True]), w)
    torch.testing.assert_close(masked, per_sample(1))
    black = target.clone()
    black[0] = 0
    torch.testing.assert_close(lq_align_loss(pred, black, sigma, keep, w), per_sample(1))
    assert lq_align_loss(pred, target, sigma, torch.zeros(3, dtype=torch.bool), w).item() == 0.0
    # Charbonnier in YCbCr: a pure luma error of d costs sqrt((0.25 * d / 2)^2 + eps^2) - eps per Y element
    d = 0.4
    gray = torch.zeros(1, 3, 2, 2)
    loss = lq_align_loss(gray + d, gray, torch.zeros(1), keep[:1], w)
    assert loss.item() == 0.0  # the zero target is "black" and masked
    base = torch.full((1, 3, 2, 2), 0.2)
    loss = lq_align_loss(base + d, base, torch.zeros(1), keep[:1], w)
    y = math.sqrt((0.25 * d / 2) ** 2 + 1e-6) - 1e-3
    assert loss.item() == pytest.approx(y / 3, rel=1e-5)  # Cb = Cr = 0 for gray


# --------------------------------------------------------------------------- degradation, time and shift
@pytest.mark.parametrize(("hw", "lq"), [((64, 96), (16, 24)), ((66, 70), (16, 17)), ((2048, 2688), (512, 672)),
                                         ((7, 4), (1, 1))])
def test_downsample_size_rule(hw, lq):
    assert lq_size(*hw) == lq
    out = downsample_lq(torch.zeros(1, 3, *hw))
    assert out.shape == (1, 3, *lq) and out.dtype == torch.float32


def test_downsample_is_pil_bicubic_and_clamped():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    hq = torch.rand(1, 3, 70, 54, generator=g) * 2 - 1
    hq[..., :24, :] = 1.5  # bands beyond [-1, 1]: the clamp matters there
    hq[..., -24:, :] = -1.5
    lq = downsample_lq(hq)
    pil = np.stack([np.asarray(Image.fromarray(hq[0, c].numpy(), mode="F").resize((13, 17), Image.BICUBIC))
                    for c in range(3)])
    np.testing.assert_allclose(lq[0].numpy(), np.clip(pil, -1, 1), atol=1e-6, rtol=0)
    assert lq.min() == -1 and lq.max() == 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        downsample_lq(torch.zeros(3, 8, 8))


@pytest.mark.parametrize(("hw", "shift"), [((2048, 2048), 6.0), ((1792, 2368), 6.018), ((1536, 2752), 6.012),
                                           ((2432, 3264), 7.037), ((3584, 3584), 7.937), ((2176, 4096), 7.244),
                                           ((1728, 2304), 5.922), ((1792, 2688), 6.211)])
def test_dynamic_shift_values(hw, shift):
    assert round(dynamic_shift(*hw), 3) == shift


@pytest.mark.parametrize("name", CASES)
def test_golden_shift_is_the_dynamic_shift(name):
    hq = _case(name)["inputs"]["hq"]
    assert dynamic_shift(*hq.shape[-2:]) == pytest.approx(_case(name)["meta"]["shift"], rel=1e-12)


def test_shift_and_logit_normal():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(shift_t(t, 1.0), t)
    torch.testing.assert_close(shift_t(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    a = logit_normal(5, torch.Generator().manual_seed(7))
    b = torch.sigmoid(torch.randn(5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(a, b) and a.dtype == torch.float32


# --------------------------------------------------------------------------- EMA and LR
def test_ema_gamma_and_beta_sequence():
    gamma = ema_gamma(0.1)
    assert gamma == pytest.approx(6.937203937601809, rel=1e-12)
    assert gamma**3 + 7 * gamma**2 - 84 * gamma - 88 == pytest.approx(0, abs=1e-9)
    assert ema_beta(0, gamma) == 0.0 and ema_beta(-3, gamma) == 0.0
    values = {1: 0.00408, 10: 0.4693, 100: 0.92406, 1000: 0.99210, 30000: 0.99974}
    for it, beta in values.items():
        assert round(ema_beta(it, gamma), len(str(beta)) - 2) == beta
    with pytest.raises(ValueError):
        ema_gamma(1.5)


def test_ema_update_and_class():
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net[1].weight.requires_grad_(False)  # frozen parameters are averaged too
    ema = EMA(net.named_parameters(), rate=0.1)
    assert ema.names == [n for n, _ in net.named_parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    assert ema.update(0) == 0.0  # the first update copies the network
    assert all(torch.equal(ema.shadow[n], p) for n, p in net.named_parameters())
    before = {n: t.clone() for n, t in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2)
    beta = ema.update(10)
    assert beta == ema_beta(10, ema.gamma)
    for n, p in net.named_parameters():
        torch.testing.assert_close(ema.shadow[n], beta * before[n] + (1 - beta) * p)
    own = {n: p.clone() for n, p in net.named_parameters()}
    with ema.swapped():
        assert all(torch.equal(ema.shadow[n], p) for n, p in net.named_parameters())
    assert all(torch.equal(own[n], p) for n, p in net.named_parameters())
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    restored = EMA(other.named_parameters())
    restored.load_state_dict(ema.state_dict())
    restored.copy_to(other)
    assert all(torch.equal(ema.shadow[n], p) for n, p in other.named_parameters())
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"0.weight": torch.zeros(3, 4)})
    a, b = [torch.ones(2)], [torch.zeros(2)]
    ema_update_(a, b, 0.25)
    assert torch.equal(a[0], torch.full((2,), 0.25))


def test_lr_warmup_schedule_values():
    f = LambdaLinear()  # the released recipe: 2000 warm-up steps from 1e-6, then constant
    assert f(0) == 1e-6
    assert f(1000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5, rel=1e-15)
    assert f(1999) == pytest.approx(1e-6 + (1 - 1e-6) * 1999 / 2000, rel=1e-15)
    assert f(2000) == 1.0 and f(30000) == 1.0 and f(10_000_000) == 1.0 and f(20_000_000) == 1.0
    decay = LambdaLinear(warm_up=2, f_start=0.0, f_max=1.0, f_min=0.5, cycle_length=6)
    assert [decay(n) for n in range(8)] == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LambdaLinear())
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-5 * f(k) for k in range(3)], rel=1e-12)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt, LambdaLinear())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 3
    with pytest.raises(ValueError, match="warm_up"):
        LambdaLinear(warm_up=10, cycle_length=10)


# --------------------------------------------------------------------------- trainable parameters
@pytest.mark.parametrize("mode", MODES)
def test_gradients_flow_only_into_trainable_parameters(mode):
    case, net = _case("v15_flux"), _net("v15_flux")
    names = set_trainable(net, mode)
    _losses(net, case)["total"].backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None}
    assert with_grad == set(names)
    if mode == "fix_backbone":
        assert all(n.startswith(("lq_proj.", "pit_lq_gate.")) for n in names)
        assert "lq_proj.lq_aux_rgb_head.3.weight" in names and "pit_lq_gate.log_alpha" in names
        assert any(n.startswith("lq_proj.gate_modules.") for n in names)
    else:
        assert set(names) == set(case["meta"]["grad_param_names"]) - {"patch_blocks.3.attn.q_norm_y.weight"}


def test_stage0_full_mode_and_mode_errors():
    net = _net("pixeldit_t2i")
    names = set_trainable(net, "full")
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    last = f"patch_blocks.{net.config.patch_depth - 1}."
    assert frozen and all(n.startswith(last) and ("_y" in n) for n in frozen)
    assert len(names) + len(frozen) == len(list(net.parameters()))
    g = torch.Generator().manual_seed(1)
    hq = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    text = torch.randn(1, 4, net.config.txt_embed_dim, generator=g)
    teacher_losses(net, hq, None, text, None, t=torch.tensor([0.3]), noise=torch.randn(hq.shape, generator=g),
                   shift=6.0)["total"].backward()
    assert {n for n, p in net.named_parameters() if p.grad is not None} == set(names)
    with pytest.raises(ValueError, match="mode 'full'"):
        set_trainable(net, "fix_backbone")
    with pytest.raises(ValueError, match="fix_backbone, full"):
        trainable_names(net, "lora")


# --------------------------------------------------------------------------- loading for training
def test_load_network_for_training_keeps_the_aux_head():
    path = GOLDEN_DIR / "v15_flux" / "model_ema_bf16.pth"
    net = _net("v15_flux")
    assert net.training and net.lq_proj.lq_aux_rgb_head is not None
    assert all(p.dtype == torch.float32 and p.requires_grad for p in net.parameters())
    ckpt = open_checkpoint(path)
    release = state_dict_for_release(net)
    assert set(release) == set(ckpt.keys)  # the released layout, aux head included
    for key in ("net.lq_proj.lq_aux_rgb_head.0.weight", "net.lq_proj.lq_aux_rgb_head.3.bias", "net.pixel_blocks.0.adaLN_modulation.0.weight"):
        assert torch.equal(release[key], ckpt.tensor(key).float())
    with torch.no_grad():  # training weights own their memory
        net.lq_proj.lq_aux_rgb_head[3].weight.add_(1)
    assert torch.equal(ckpt.tensor("net.lq_proj.lq_aux_rgb_head.3.weight").float(), _net("v15_flux").lq_proj.lq_aux_rgb_head[3].weight)

    inference = _net("v15_flux", training=False)
    assert not inference.training and inference.lq_proj.lq_aux_rgb_head is None
    assert not any("aux" in k for k in inference.state_dict())
    assert not any(p.requires_grad for p in inference.parameters())
    with pytest.raises(ValueError, match="float32"):
        load_network(path, _config("v15_flux"), training=True, dtype=torch.bfloat16)


def test_training_load_of_a_file_without_the_aux_head_names_the_missing_keys(tmp_path):
    state = torch.load(GOLDEN_DIR / "v15_flux" / "model_ema_bf16.pth", weights_only=True)
    path = tmp_path / "no_aux.pth"
    torch.save({k: v for k, v in state.items() if "lq_aux_rgb_head" not in k}, path)
    load_network(path, _config("v15_flux"))  # inference does not need it
    with pytest.raises(ValueError, match="lq_aux_rgb_head"):
        load_network(path, _config("v15_flux"), training=True)



def test_training_load_without_the_aux_head_in_the_config_drops_it():
    from dataclasses import replace

    config = _config("v15_flux")
    config = replace(config, lq=replace(config.lq, aux_rgb_head=False))
    net = load_network(GOLDEN_DIR / "v15_flux" / "model_ema_bf16.pth", config, training=True)
    assert net.training and net.lq_proj.lq_aux_rgb_head is None
    out = _losses(net, _case("v15_flux"))
    assert set(out) == {"diffusion", "total"}
    torch.testing.assert_close(out["diffusion"].detach(), _golden_run("v15_flux")[1]["diffusion"], rtol=1e-6, atol=0)
