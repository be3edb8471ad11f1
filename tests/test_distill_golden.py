"""DMD2 distillation losses against the reference's own code (tests/fixtures/distill_golden, README there).

Each case holds three tiny networks (teacher, student, fake score), a seeded discriminator and every random draw
of one student and one critic step; the expected values were computed by the reference's
``PidDistillModel._student_update_step`` / ``._fake_score_update_step`` in float32 on CPU, with the GAN on
(``gan_on``) and off (``gan_off``). The fixture folder is a verbatim copy of the shared set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pid_decoder import load_network
from pid_decoder.training.discriminator import Discriminator, TeacherWithFeatures
from pid_decoder.training.distill_losses import distill_critic_losses, distill_student_losses

from .conftest import FIXTURES

DISTILL_GOLDEN = FIXTURES / "distill_golden"
CASES = sorted(p.name for p in DISTILL_GOLDEN.iterdir() if (p / "meta.json").is_file())
VARIANTS = ("gan_on", "gan_off")
PHASES = {"student": ("student",), "critic": ("fake_score", "discriminator")}  # the nets each phase trains
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL_OF_TOTAL = 1e-4, 1e-6


class _Case(dict):
    """A case's data; its repr is its name (pytest prints fixture values in failure reports)."""

    def __repr__(self) -> str:
        return f"<distill case {self['meta']['case']}>"


def _load(folder: Path) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((folder / "meta.json").read_text())
    net_cfg = meta["net"]
    teacher_net = load_network(folder / meta["teacher_checkpoint"], config=net_cfg, training=True)
    teacher_net.requires_grad_(False).eval()
    d = meta["discriminator"]
    disc = Discriminator(d["inner_dim"], d["feature_indices"], d["num_blocks"], d["num_conv_layers"])
    disc.load_state_dict(load_file(folder / meta["discriminator_state"]), strict=True)
    return _Case({
        "meta": meta,
        "student": load_network(folder / meta["student_checkpoint"], config=net_cfg, training=True),
        "fake_score": load_network(folder / meta["fake_score_checkpoint"], config=net_cfg, training=True),
        "teacher": TeacherWithFeatures(teacher_net, disc.indices),
        "discriminator": disc,
        # Clone: tensors straight from a safetensors loader can be unaligned, which perturbs low bits.
        "inputs": {k: v.clone() for k, v in load_file(folder / "inputs.safetensors").items()},
        "expected": load_file(folder / "expected.safetensors"),
    })


def _run(case: dict, variant: str, phase: str) -> dict:
    """Losses (float) and per-parameter gradients (by reference name) of every net after ``total.backward()``."""
    meta, inp = case["meta"], case["inputs"]
    spec = next(v for v in meta["variants"] if v["name"] == variant)
    nets = {name: case[name] for name in ("student", "fake_score", "discriminator")}
    nets["teacher"] = case["teacher"].net
    for net in nets.values():  # every flag stays as loaded: the losses alone must route the gradients
        net.zero_grad(set_to_none=True)
    disc = case["discriminator"] if spec["gan"] else None
    batch = (inp["hq"], inp["lq_latent"], inp["text"], inp["degrade_sigma"])
    draws = {k: inp[f"{phase}.{k}"] for k in ("k", "noise", "t", "eps")}
    t_list = meta["t_list"][:-1]
    G, T, Fk = case["student"], case["teacher"], case["fake_score"]
    if phase == "student":
        out = distill_student_losses(
            G, T, Fk, disc, *batch, inp["null_text"], **draws, t_list=t_list,
            cfg_scale=float(meta["recipe"]["teacher_cfg_scale"]), vsd_weight=1.0, gan_weight=spec["gan_weight"],
            amp_dtype=None,
        )
    else:
        out = distill_critic_losses(
            G, T, Fk, disc, *batch, **draws, r1_noise=inp["critic.r1_noise"] if spec["gan"] else None,
            t_list=t_list, dsm_weight=1.0, r1_weight=spec["r1_weight"], r1_alpha=meta["recipe"]["gan_r1_reg_alpha"],
            amp_dtype=None,
        )
    out["total"].backward()
    grads = {
        name: {n: None if p.grad is None else p.grad.detach().clone() for n, p in net.named_parameters()}
        for name, net in nets.items()
    }
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    return {"losses": {k: float(v.detach()) for k, v in out.items()}, "grads": grads}


@pytest.fixture(scope="module", params=CASES)
def case(request):
    """One case's networks, inputs and expected values, loaded once; runs are computed on first use."""
    data = _load(DISTILL_GOLDEN / request.param)
    data["runs"] = {}
    return data


def _result(case: dict, variant: str, phase: str) -> dict:
    key = (variant, phase)
    if key not in case["runs"]:
        case["runs"][key] = _run(case, variant, phase)
    return case["runs"][key]


def _norm(grad: torch.Tensor | None) -> torch.Tensor:
    """float64 L2 norm; a parameter without a gradient has norm 0 (the reference may hold a zero tensor)."""
    return torch.zeros((), dtype=torch.float64) if grad is None else grad.double().norm()


def _loss_names(phase: str) -> tuple[str, ...]:
    return ("vsd", "gan_gen", "total") if phase == "student" else ("dsm", "disc", "r1", "total")


def test_teacher_is_the_checkpoint_the_case_was_made_with(case):
    path = DISTILL_GOLDEN / case["meta"]["case"] / case["meta"]["teacher_checkpoint"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == case["meta"]["teacher_sha256"], path


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_losses(case, variant, phase):
    got = _result(case, variant, phase)["losses"]
    for name in _loss_names(phase):
        want = case["expected"][f"{variant}.{phase}.{name}"].item()
        # R1 is a mean square of two nearly equal logits: a 1e-6 error per logit moves it by 2 sqrt(r1) 1e-6.
        slack = 2 * want**0.5 * 1e-6 if name == "r1" else 0.0
        assert abs(got[name] - want) <= LOSS_RTOL * abs(want) + slack, (name, got[name], want)


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_norms(case, variant, phase):
    grads = _result(case, variant, phase)["grads"]
    names = case["meta"]["grad_param_names"]
    checked = 0
    for net in PHASES[phase]:
        key = f"{variant}.{phase}.{net}"
        want = case["expected"][f"{variant}.{phase}.grad_norms.{net}"]
        if want.numel() == 0:  # the reference trains no parameter of this net here (D with the GAN off)
            continue
        got = torch.stack([_norm(grads[net][n]) for n in names[key]])  # (n_params,)
        total_want = want.square().sum().sqrt()
        total_got = torch.stack([_norm(g) for g in grads[net].values()]).square().sum().sqrt()
        assert abs(total_got - total_want) <= GRAD_RTOL * total_want + GRAD_ATOL_OF_TOTAL * total_want, (
            net, total_got.item(), total_want.item())
        bad = (got - want).abs() > GRAD_RTOL * want + GRAD_ATOL_OF_TOTAL * total_want
        worst = [(n, got[i].item(), want[i].item()) for i, n in enumerate(names[key]) if bad[i]][:5]
        assert not bad.any(), f"{key}: {int(bad.sum())} of {len(names[key])} parameter norms differ, e.g. {worst}"
        checked += 1
    assert checked


def _touched(grads: dict[str, torch.Tensor | None]) -> list[str]:
    return [n for n, g in grads.items() if g is not None and bool(g.abs().sum() > 0)]


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_gradient_where_the_reference_has_none(case, variant, phase):
    """Every flag is as loaded (student, fake score and D all require grad): the losses alone route gradients."""
    meta = case["meta"]
    for net, net_grads in _result(case, variant, phase)["grads"].items():
        key = f"{variant}.{phase}.{net}"
        touched = _touched(net_grads)
        if key in meta["grad_param_names"]:
            assert not set(touched) & set(meta["params_without_grad"][key]), key
            assert set(touched) <= set(meta["grad_param_names"][key]), key
        else:  # a net the reference does not train in this phase
            assert not touched, (key, touched[:5])
