"""The distillation run end to end on the tiny CPU configs: teacher -> distill -> export -> sample; resume; 2 ranks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = ROOT / "configs" / "train" / "tiny-cpu.toml"
DISTILL_CONFIG = ROOT / "configs" / "distill" / "tiny-cpu.toml"
DATA = ROOT / "configs" / "train" / "tiny-data"
RES = 32  # 2x2 patch grid: the smallest the discriminator head takes
ITERS = 8  # student updates at iterations 0 and 6, critic updates in between
QUIET = ["log.progress=false", "log.tensorboard=false", f'data.path="{DATA}"', f'data.buckets="square-{RES}"']
ENTRIES = ("net", "net_ema", "fake_score", "discriminator")


def _distill_cfg(run_dir: Path, teacher: Path, *extra: str):
    from pid_decoder.training.config import load_config

    return load_config(DISTILL_CONFIG, QUIET + [
        f'run.dir="{run_dir}"', f'distill.teacher="{teacher}"', f"run.max_steps={ITERS}", "validation.every=0",
        "checkpoint.every=1000", "data.batch_size=2", *extra,
    ])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A tiny teacher trained briefly (configs/train/tiny-cpu.toml) on the four tiny-data images."""
    from pid_decoder.training.config import load_config
    from pid_decoder.training.trainer import train

    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(TEACHER_CONFIG, QUIET + [
        f'run.dir="{run}"', "run.max_steps=30", "data.batch_size=4", "optim.lr=3e-3", "validation.every=0",
        "checkpoint.every=1000",
    ])
    train(cfg)
    return run


@pytest.fixture(scope="module")
def student_run(teacher_run, tmp_path_factory) -> Path:
    """An uninterrupted distillation of ``ITERS`` iterations."""
    from pid_decoder.training.distiller import distill

    run = tmp_path_factory.mktemp("student") / "run"
    result = distill(_distill_cfg(run, teacher_run, f"validation.every={ITERS}", "validation.steps=4"))
    assert result.step == ITERS and not result.stopped
    return run


def _final(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    from pid_decoder.training.checkpoint import CheckpointManager, read_tensors

    path = CheckpointManager(run).latest()
    return {entry: read_tensors(path, entry) for entry in ENTRIES}


def test_distill_records_both_phases_and_keeps_the_teacher_out_of_the_checkpoint(student_run):
    import json

    from pid_decoder.training.checkpoint import CheckpointManager, read_tensors

    path = CheckpointManager(student_run).latest()
    assert path.name.endswith(f"{ITERS:09d}")
    with pytest.raises(Exception, match="no 'teacher' entry"):
        read_tensors(path, "teacher")
    lines = [json.loads(x) for x in (student_run / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "vsd" in x][-1]
    for key in ("vsd", "gan_gen", "dsm", "disc", "r1", "grad_norm", "lr"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    val = [x for x in lines if "val_student_teacher_l1" in x]
    assert len(val) == 1 and 0 < val[0]["val_student_teacher_l1"] < 2 and val[0]["step"] == ITERS
    assert (student_run / "validation" / f"step_{ITERS:09d}.png").is_file()
    state = _final(student_run)
    assert not any(k.startswith("lq_proj.lq_aux_rgb_head") for k in state["net"])  # aux head off (spec §1)
    assert set(state["discriminator"]) == {f"cls_pred_heads.0.{i}.{n}" for i in (0, 1, 3) for n in ("weight", "bias")}


def test_kill_and_resume_equals_uninterrupted(teacher_run, student_run, tmp_path):
    from pid_decoder.training.distiller import distill
    from pid_decoder.training.trainer import StopSignal

    run = tmp_path / "run"
    stop = StopSignal()

    def on_step(step, _):
        if step == 5:  # mid-cycle: the next iteration is a critic one, the one after it a student one
            stop.request()

    first = distill(_distill_cfg(run, teacher_run), stop=stop, on_step=on_step)
    assert first.stopped and first.step == 5
    second = distill(_distill_cfg(run, teacher_run), resume=True)
    assert second.step == ITERS and not second.stopped
    resumed, straight = _final(run), _final(student_run)
    for entry in ENTRIES:
        for name, tensor in straight[entry].items():
            torch.testing.assert_close(resumed[entry][name], tensor, rtol=0, atol=0, msg=f"{entry}.{name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, run: str, teacher: str, parallel: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pid_decoder.training.distiller import distill
    from pid_decoder.training.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    try:
        distill(_distill_cfg(Path(run), Path(teacher), "data.batch_size=1", f'run.parallel="{parallel}"'), info=info)
    finally:
        shutdown(info)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process(teacher_run, student_run, tmp_path, parallel):
    import torch.multiprocessing as mp

    run = tmp_path / parallel
    mp.start_processes(_rank_main, args=(2, _free_port(), str(run), str(teacher_run), parallel), nprocs=2, join=True,
                       start_method="spawn")
    two, one = _final(run), _final(student_run)  # 2 ranks x batch 1 vs 1 process x batch 2
    # Same draws and data; only the gradient summation order differs (all-reduce / reduce-scatter), which Adam
    # turns into differences of ~1e-5 after these few lr-1e-3 steps. A wrong data or noise slice gives ~1e-3.
    # FSDP2 stores 0-d parameters (the gates' log_alpha) as 1-element tensors: compare values.
    for entry in ENTRIES:
        for name, tensor in one[entry].items():
            other = two[entry][name]
            assert other.numel() == tensor.numel(), f"{entry}.{name}: {tuple(other.shape)} vs {tuple(tensor.shape)}"
            torch.testing.assert_close(other.reshape(tensor.shape), tensor, rtol=1e-4, atol=5e-5,
                                       msg=lambda m, key=f"{entry}.{name}": f"{key}: {m}")


def test_exported_student_loads_and_samples(student_run, tmp_path):
    from pid_decoder.checkpoints import load_network
    from pid_decoder.sampling import sample
    from pid_decoder.training.distiller import student_net_config
    from pid_decoder.training.export import export_run, load_run_network

    sft = export_run(student_run, tmp_path / "student.safetensors")
    pth = export_run(student_run, tmp_path / "model_ema_bf16.pth")
    ema = load_run_network(student_run, which="ema")
    net_config = student_net_config(_run_config(student_run))
    for net in (load_network(sft), load_network(pth, net_config)):
        for name, p in net.named_parameters():  # the EMA, stored in bf16
            torch.testing.assert_close(p, ema.get_parameter(name).to(torch.bfloat16).float(), msg=name)
        z = torch.randn(1, 12, RES // 8, RES // 8)
        out = sample(net, z, torch.zeros(1, 8, 24), 0.0, height=RES, width=RES, steps=4,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (1, 3, RES, RES) and torch.isfinite(out).all()


def _run_config(run: Path):
    import json

    from pid_decoder.training.config import config_from_dict

    return config_from_dict(json.loads((run / "config.json").read_text()))


def test_cli_distill(teacher_run, tmp_path, capsys):
    from pid_decoder.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["distill", "--help"])
    assert exc.value.code == 0 and "--resume" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # a teacher config has no [distill] section
        main(["distill", str(TEACHER_CONFIG)])
    assert exc.value.code == 2 and "no [distill] section" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["distill", str(DISTILL_CONFIG), "--set", f'distill.teacher="{tmp_path / "missing.pth"}"'])
    assert exc.value.code == 2 and "distill.teacher not found" in capsys.readouterr().err
    run = tmp_path / "cli"
    args = ["distill", str(DISTILL_CONFIG), "-q"] + [x for s in QUIET + [
        f'run.dir="{run}"', f'distill.teacher="{teacher_run}"', "run.max_steps=2", "validation.every=0",
        "data.batch_size=1"] for x in ("--set", s)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith("step_000000002")


def test_networks_from_a_release_layout_teacher_file(teacher_run, tmp_path):
    """A `*_undistilled`-style file (release layout, with the aux head's keys) initialises student, fake score and
    teacher alike; the aux head is ignored, the teacher is frozen and nothing else is dropped."""
    from pid_decoder.training.distiller import build_networks
    from pid_decoder.training.export import export_run, load_run_network

    pth = export_run(teacher_run, tmp_path / "model_ema_bf16.pth", dtype=torch.float32)
    keys = torch.load(pth, weights_only=True).keys()
    assert any(k.startswith("net.lq_proj.lq_aux_rgb_head.") for k in keys)  # the teacher run trains the aux head
    cfg = _distill_cfg(tmp_path / "run", pth)
    student, teacher, fake, disc = build_networks(cfg, torch.device("cpu"))
    reference = load_run_network(teacher_run, which="ema").state_dict()
    for net in (student, teacher, fake):
        state = net.state_dict()
        assert set(reference) - set(state) == {k for k in reference if k.startswith("lq_proj.lq_aux_rgb_head.")}
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0, msg=name)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("patch_blocks.1.") for n in frozen)  # the last block's text output branch
    assert disc.indices == (1,) and all(p.requires_grad for p in disc.parameters())
