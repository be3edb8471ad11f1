"""The stage-0/1 training loop on the tiny CPU config: learning, stop/resume, checkpoints, export, bad input, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pid_decoder import load_network, sample_teacher
from pid_decoder.cli import main
from pid_decoder.training import checkpoint as ckpt_module
from pid_decoder.training.checkpoint import CheckpointError, CheckpointManager, ModelState, read_tensors
from pid_decoder.training.config import ConfigError, config_from_dict, load_config
from pid_decoder.training.export import export_run
from pid_decoder.training.trainer import StopSignal, build_optimizer, build_scheduler, optimizer_step, train

from .conftest import KEYS_DIR

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny-cpu.toml"
DATA = TINY.parent / "tiny-data"


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()  # the tiny config runs with one thread
    yield
    torch.set_num_threads(threads)


def tiny(run_dir: Path, *sets: str):
    base = [f"run.dir={json.dumps(str(run_dir))}", f"data.path={json.dumps(str(DATA))}", "log.progress=false",
            "log.tensorboard=false", "validation.every=0"]
    return load_config(TINY, [*base, *sets])


def run_losses(cfg, **kwargs) -> tuple[list[float], object]:
    losses: list[float] = []
    result = train(cfg, on_step=lambda step, m: losses.append(float(m["loss"])), **kwargs)
    return losses, result


# --------------------------------------------------------------------------- learning
def test_tiny_teacher_overfits_four_images(tmp_path):
    # Fixed-size flow-matching problem: no latent noise or LQ dropout, t concentrated near 1 (static shift 30).
    cfg = tiny(tmp_path / "run", "run.max_steps=100", "checkpoint.every=1000", "log.every=1000",
               "conditioning.noise_prob=0.0", "conditioning.lq_dropout=0.0", "optim.warmup_steps=0",
               'loss.shift="static"', "loss.static_shift=30.0", "optim.lr=3e-3", "optim.grad_clip=100.0")
    losses, result = run_losses(cfg)
    assert len(losses) == 100 and result.step == 100
    late = sum(losses[-10:]) / 10
    assert late <= losses[0] / 5, f"loss fell from {losses[0]:.3f} to {late:.3f}, less than 5x"


# --------------------------------------------------------------------------- stop and resume
def test_stop_then_resume_equals_uninterrupted(tmp_path):
    sets = ["run.max_steps=6", "checkpoint.every=100", "log.every=1", "optim.grad_accum=2", "validation.every=3",
            "validation.steps=2"]
    full, _ = run_losses(tiny(tmp_path / "full", *sets))

    stop = StopSignal()

    def request_at_3(step, metrics):
        if step == 3:
            stop.request()

    first = train(tiny(tmp_path / "cut", *sets), stop=stop, on_step=request_at_3)
    assert first.stopped and first.step == 3
    assert [p.name for p in CheckpointManager(tmp_path / "cut").checkpoints()] == ["step_000000003"]
    rest, second = run_losses(tiny(tmp_path / "cut", *sets), resume=True)
    assert second.step == 6 and not second.stopped
    assert rest == full[3:]  # the same numbers, bit for bit
    for entry in ("net", "net_ema", "optim"):
        a = read_tensors(tmp_path / "full" / "checkpoints" / "step_000000006", entry)
        b = read_tensors(tmp_path / "cut" / "checkpoints" / "step_000000006", entry)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (entry, key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "cut" / "validation").iterdir()) == ["step_000000003.png",
                                                                                     "step_000000006.png"]


def test_sigterm_saves_at_the_step_boundary_and_resume_continues_exactly(tmp_path):
    run_dir = tmp_path / "killed"
    sets = ["run.max_steps=1000", "checkpoint.every=1000", "log.every=1"]
    cmd = [sys.executable, "-m", "pid_decoder.cli", "train", str(TINY)]
    base = [f"run.dir={json.dumps(str(run_dir))}", f"data.path={json.dumps(str(DATA))}", "log.progress=false",
            "log.tensorboard=false", "validation.every=0", *sets]
    for item in base:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    saved = CheckpointManager(run_dir).latest()
    k = json.loads((saved / "meta.json").read_text())["step"]
    assert 2 <= k < 1000 and out.strip().endswith(saved.name)

    n = k + 2
    rest, _ = run_losses(tiny(run_dir, *sets, f"run.max_steps={n}"), resume=True)
    full, _ = run_losses(tiny(tmp_path / "full", *sets, f"run.max_steps={n}"))
    assert rest == full[k:]
    a, b = read_tensors(CheckpointManager(run_dir).latest(), "net"), read_tensors(
        CheckpointManager(tmp_path / "full").latest(), "net")
    assert all(torch.equal(a[key], b[key]) for key in a)


# --------------------------------------------------------------------------- checkpoint files
def _small_state():
    net = torch.nn.Linear(3, 2)
    return net, {"net": ModelState(net), "trainer": {"step": 0}}


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net, state = _small_state()
    manager = CheckpointManager(tmp_path, keep_last=2, config={"a": 1})
    manager.save(1, state)
    saved = net.weight.detach().clone()
    real_save = ckpt_module.dcp.save

    def crash(state_dict, *, checkpoint_id, **kwargs):
        real_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)  # every shard written ...
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"torn")  # ... one torn, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.dcp, "save", crash)
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, state)
    assert [p.name for p in manager.checkpoints()] == ["step_000000001"]
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert manager.load(manager.latest(), state) == 1
    assert torch.equal(net.weight, saved)
    monkeypatch.setattr(ckpt_module.dcp, "save", real_save)
    manager.save(3, state)  # the next save removes the torn temp folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000001", "step_000000003"]


def test_keeps_the_last_k_checkpoints(tmp_path):
    _, state = _small_state()
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (5, 10, 15, 20):
        manager.save(step, state)
    assert [p.name for p in manager.checkpoints()] == ["step_000000015", "step_000000020"]
    assert manager.resolve(True) == manager.resolve("latest") == manager.latest()
    assert manager.resolve(tmp_path) == manager.latest()  # a run directory: its newest checkpoint
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        manager.resolve(tmp_path / "nowhere")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 4 steps (checkpoint at 4)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    threads = torch.get_num_threads()
    try:
        train(tiny(run_dir, "run.max_steps=4", "checkpoint.every=100"))
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_config_is_saved_with_the_run_and_every_checkpoint(trained):
    saved = json.loads((trained / "config.json").read_text())
    cfg = config_from_dict(saved)
    assert cfg.run.max_steps == 4 and cfg.net_config.lq.latent_channels == 12
    checkpoint = CheckpointManager(trained).latest()
    assert json.loads((checkpoint / "config.json").read_text()) == saved


def test_resume_refuses_a_different_config_and_names_the_keys(trained):
    cfg = tiny(trained, "run.max_steps=8", "checkpoint.every=100", "optim.lr=1e-2", "ema.rate=0.2")
    with pytest.raises(CheckpointError, match=r"optim\.lr: 0\.002 -> 0\.01; .*|ema\.rate.*optim\.lr") as err:
        train(cfg, resume=True)
    assert "ema.rate" in str(err.value) and "optim.lr" in str(err.value)


def test_a_fresh_run_refuses_a_directory_with_checkpoints(trained):
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny(trained, "run.max_steps=4", "checkpoint.every=100"))


# --------------------------------------------------------------------------- export
def test_export_loads_and_decodes(trained, tmp_path):
    cfg = config_from_dict(json.loads((trained / "config.json").read_text()))
    sft = export_run(trained, tmp_path / "tiny.safetensors")
    pth = export_run(trained, tmp_path / "tiny.pth")
    ema = read_tensors(CheckpointManager(trained).latest(), "net_ema")
    released = torch.load(pth, weights_only=True)
    assert all(k.startswith("net.") for k in released) and {v.dtype for v in released.values()} == {torch.bfloat16}
    assert any(k.startswith("net.lq_proj.lq_aux_rgb_head.") for k in released)  # as the *_undistilled files
    training_net = load_network(pth, cfg.net_config, training=True)
    for name, p in training_net.named_parameters():
        torch.testing.assert_close(p, ema[name].to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    for net in (load_network(sft), load_network(pth, cfg.net_config)):
        lq = torch.randn(1, 12, 8, 8, generator=torch.Generator().manual_seed(0))
        out = sample_teacher(net, lq, torch.zeros(1, 8, 24), 0.0, height=64, width=64, steps=2, cfg_scale=1.0,
                             generator=torch.Generator().manual_seed(0))
        assert out.shape == (1, 3, 64, 64) and bool(torch.isfinite(out).all())


def _release_depth_run(tmp_path: Path, net_table: dict, stage: str) -> Path:
    """A run directory whose network has the released depths (tiny widths) and one checkpoint of fresh weights."""
    from pid_decoder.training.schedules import EMA
    from pid_decoder.training.trainer import init_network

    data = {
        "run": {"dir": str(tmp_path), "stage": stage},
        "model": {"preset": "", "net": net_table, "trainable": "full" if stage == "pixeldit" else "fix_backbone"},
        "conditioning": {"backbone": "flux"},
    }
    cfg = config_from_dict(data)
    net = init_network(cfg, torch.device("cpu"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(cfg.to_json())
    ema = EMA(net.named_parameters())
    CheckpointManager(tmp_path).save(1, {"net": ModelState(net), "net_ema": ema})
    return tmp_path


WIDTHS = {"hidden_size": 32, "num_groups": 2, "pixel_hidden_size": 4, "pixel_attn_hidden_size": 16,
          "pixel_num_groups": 2, "txt_embed_dim": 24, "txt_max_length": 8, "rope_ref_h": 2048, "rope_ref_w": 2048}


@pytest.mark.parametrize(
    ("keys_file", "net_table", "stage"),
    [
        ("PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled.txt",
         {**WIDTHS, "lq": {"latent_channels": 16, "hidden_dim": 8, "num_res_blocks": 4, "padding_mode": "replicate",
                           "gate_type": "sigma_aware_per_token", "interval": 2, "pit_inject": True,
                           "aux_rgb_head": True}}, "teacher"),
        ("PixelDiT_finetune_2kto4k.txt", {**WIDTHS, "lq": None}, "pixeldit"),
    ],
)
def test_exported_keys_equal_the_released_layout(tmp_path, keys_file, net_table, stage):
    run_dir = _release_depth_run(tmp_path / "run", net_table, stage)
    out = export_run(run_dir, tmp_path / "model_ema_bf16.pth")
    released = [line.split()[0] for line in (KEYS_DIR / keys_file).read_text().splitlines() if line.strip()]
    assert sorted(torch.load(out, weights_only=True)) == sorted(released)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["optim.learning_rate=1"], r"unknown config key 'optim\.learning_rate'; valid keys of optim: lr, "),
        (["optim.lr=fast"], r"optim\.lr must be a finite number, got 'fast'"),
        (["run.parallel=\"tp\""], r"run\.parallel must be one of 'auto', 'single', 'ddp', 'fsdp', got 'tp'"),
        (["conditioning.backbone=\"flux\""], r"'flux' gives 16-channel latents at 1/8.*expects 12 channels at 1/2"),
        (["conditioning.backbone=\"nope\""], r"unknown backbone 'nope'"),
        (["run.stage=\"pixeldit\""], r"run\.stage = \"pixeldit\" trains the text-to-image PixelDiT"),
        (["model.preset=\"flux-4k\""], r"exactly one of model\.preset .* or a \[model\.net\] table"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, sets, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        train(tiny(tmp_path / "run", *sets))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_and_empty_datasets_fail_before_the_first_step(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        train(tiny(tmp_path / "a", f"data.path={json.dumps(str(tmp_path / 'nowhere'))}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        train(tiny(tmp_path / "b", f"data.path={json.dumps(str(tmp_path / 'empty'))}"))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_unwritable_run_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="run.dir .* is not writable"):
        train(tiny(blocker / "run"))


def test_optimizer_step_skips_a_non_finite_step(tmp_path):
    from pid_decoder.training.config import OptimConfig

    net = torch.nn.Linear(4, 3)
    params = list(net.parameters())
    cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.1)
    opt, before = build_optimizer(params, cfg, torch.device("cpu")), [p.detach().clone() for p in params]
    sched = build_scheduler(opt, cfg)
    net(torch.randn(2, 4)).sum().backward()
    params[0].grad[0, 0] = float("inf")  # becomes 0, so this step is finite
    norm = optimizer_step(params, opt, sched, max_norm=0.1)
    assert torch.isfinite(norm) and not torch.equal(params[1], before[1])
    after_first = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 3e38)  # finite values whose norm overflows: the step is skipped
    optimizer_step(params, opt, sched, max_norm=0.1)
    assert all(torch.equal(a, p) for a, p in zip(after_first, params))
    assert sched.last_epoch == 2 and all(p.grad is None for p in params)
    assert int(opt.state[params[0]]["step"]) == 1


# --------------------------------------------------------------------------- command line
@pytest.mark.parametrize("command", ["train", "export"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert ("--resume" in out and "--set" in out) if command == "train" else ("--format" in out and "RUN_DIR" in out)


def test_cli_reports_config_errors_as_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(TINY), "--set", "optim.nope=1"])
    assert exit_.value.code == 2
    assert "unknown config key 'optim.nope'" in capsys.readouterr().err


def test_cli_export(trained, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["export", str(trained), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(trained), "-o", str(out)])
    assert exit_.value.code == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path), "-o", str(tmp_path / "x.pth")])
    assert exit_.value.code == 2 and "not a training run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- released recipes
RECIPES = {  # file: (stage, preset or None, buckets, batch, lr, weight decay, shift, grad accum, latent channels)
    "teacher-flux-2048": ("teacher", "flux-4k-undistilled", "2048", 2, 5e-5, 1e-3, "dynamic", 1, 16),
    "teacher-flux-3840": ("teacher", "flux-4k-undistilled", "multires_2048_3840", 1, 5e-5, 1e-3, "dynamic", 1, 16),
    "teacher-flux2-2048": ("teacher", "flux2-4k-undistilled", "2048", 2, 5e-5, 1e-3, "dynamic", 1, 128),
    "teacher-flux2-3840": ("teacher", "flux2-4k-undistilled", "multires_2048_3840", 1, 5e-5, 1e-3, "dynamic", 1, 128),
    "teacher-qwenimage-2048": ("teacher", "qwenimage-4k-undistilled", "2048", 2, 5e-5, 1e-3, "dynamic", 1, 16),
    "teacher-qwenimage-3840": ("teacher", "qwenimage-4k-undistilled", "multires_2048_3840", 1, 5e-5, 1e-3, "dynamic",
                               1, 16),
    "pixeldit-2048": ("pixeldit", None, "2048", 1, 1e-5, 0.0, "static", 1, None),
    "pixeldit-3840": ("pixeldit", None, "multires_2048_3840", 1, 1e-5, 0.0, "dynamic", 2, None),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_released_recipes(name):
    from pid_decoder.presets import resolve_preset
    from pid_decoder.training.trainer import validate_config

    stage, preset, buckets, batch, lr, wd, shift, accum, channels = RECIPES[name]
    cfg = load_config(TINY.parent / f"{name}.toml")
    assert (cfg.run.stage, cfg.data.buckets, cfg.data.batch_size) == (stage, buckets, batch)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.shift, cfg.optim.grad_accum) == (lr, wd, shift, accum)
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.warmup_steps, cfg.optim.warmup_start) == ((0.9, 0.999), 1e-8,
                                                                                                2000, 1e-6)
    assert (cfg.optim.grad_clip, cfg.ema.rate, cfg.run.precision, cfg.conditioning.caption_dropout) == (0.1, 0.1,
                                                                                                       "bf16", 0.1)
    assert (cfg.checkpoint.every, cfg.log.every, cfg.loss.static_shift, cfg.loss.base_size) == (5000, 50, 6.0, 2048)
    assert cfg.model.init == "checkpoints/PixelDiT_finetune_2kto4k/model_ema_bf16.pth"
    net = cfg.net_config
    if stage == "teacher":
        assert net == resolve_preset(preset).net and net.lq.latent_channels == channels and net.lq.aux_rgb_head
        assert (cfg.model.trainable, cfg.run.max_steps) == ("fix_backbone", 30_000)
        assert (cfg.conditioning.noise_prob, cfg.conditioning.sigma_max, cfg.conditioning.lq_dropout) == (0.75, 0.8, 0.1)
        loss = cfg.loss
        assert (loss.diffusion_weight, loss.lq_align_weight, loss.lq_align_y_weight, loss.lq_align_chroma_weight,
                loss.lq_align_eps, loss.lq_align_sigma_power) == (1.0, 0.8, 0.25, 1.0, 1e-3, 1.0)
    else:
        assert net.lq is None and cfg.model.trainable == "full"
        assert net.rope_mode == ("original" if name.endswith("2048") else "ntk_aware")
        assert (net.rope_ref_h, net.hidden_size, net.patch_depth) == (2048, 1536, 14)
    with pytest.raises(ConfigError, match="model.init file not found"):  # everything else validates
        validate_config(cfg)


# --------------------------------------------------------------------------- text from the pre-pass
def test_trains_on_precomputed_text_embeddings(tmp_path):
    pytest.importorskip("transformers")
    import shutil

    from transformers import Gemma2Model

    from pid_decoder.text import TextEncoder
    from pid_decoder.training.embed_dataset import embed_dataset

    from .test_text import HIDDEN, _gemma_config, _word_level_tokenizer

    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    tokenizer = _word_level_tokenizer()
    torch.manual_seed(0)
    encoder = TextEncoder("tiny-gemma", tokenizer=tokenizer, decoder=Gemma2Model(_gemma_config(len(tokenizer))).eval(),
                          cache_dir=False, dtype=torch.float32)
    embed_dataset(data, encoder=encoder)
    cfg = tiny(tmp_path / "run", f"data.path={json.dumps(str(data))}", 'data.text="embeddings"',
               f"model.net.txt_embed_dim={HIDDEN}", "run.max_steps=3", "checkpoint.every=100",
               "conditioning.caption_dropout=0.5", "validation.every=3", "validation.steps=2",
               "validation.cfg_scale=2.0")
    losses, result = run_losses(cfg)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "run" / "validation" / "step_000000003.png").is_file()
    with pytest.raises(ConfigError, match="has no embedding folder"):
        train(tiny(tmp_path / "run2", 'data.text="embeddings"', "run.max_steps=1"))


def test_unchecked_lq_encode_equals_the_conditioner(tmp_path):
    from pid_decoder.training.conditioning import LQConditioner
    from pid_decoder.training.degrade import downsample_lq
    from pid_decoder.training.trainer import PixelsBackbone, encode_lq

    cond = LQConditioner(PixelsBackbone(), tiny(tmp_path).net_config)
    lq = downsample_lq(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert torch.equal(encode_lq(cond, lq), cond.encode(lq))


def test_import_pid_decoder_does_not_import_training():
    code = "import sys, pid_decoder, pid_decoder.cli; print(sorted(m for m in sys.modules if '.training' in m))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_init_from_a_file_without_lq_branch_starts_the_lq_branch_fresh(trained, tmp_path):
    import math

    from pid_decoder.training.trainer import init_network

    full = torch.load(export_run(trained, tmp_path / "full.pth", dtype="fp32"), weights_only=True)
    backbone_only = {k: v for k, v in full.items() if not k.startswith(("net.lq_proj.", "net.pit_lq_gate."))}
    torch.save(backbone_only, tmp_path / "pixeldit.pth")
    cfg = tiny(tmp_path / "run", f"model.init={json.dumps(str(tmp_path / 'pixeldit.pth'))}")
    net = init_network(cfg, torch.device("cpu"))
    state = net.state_dict()
    assert all(torch.equal(state[k.removeprefix("net.")], v) for k, v in backbone_only.items())
    heads = [*net.lq_proj.output_heads, net.lq_proj.pit_head]
    assert all(not h.weight.any() and not h.bias.any() for h in heads)  # LQ injection starts at exactly 0
    gates = [*net.lq_proj.gate_modules, net.pit_lq_gate]
    assert all(torch.all(g.content_proj.bias == 2.0) and math.isclose(float(g.log_alpha.detach()), math.log(5), rel_tol=1e-6)
               for g in gates)
    torch.save({**backbone_only, "net.extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"does not fit the configured network: unexpected keys: extra\.weight"):
        init_network(tiny(tmp_path / "run", f"model.init={json.dumps(str(tmp_path / 'bad.pth'))}"), torch.device("cpu"))


def test_validation_grid_and_checkpoint_contents(trained, tmp_path):
    from PIL import Image

    latest = CheckpointManager(trained).latest()
    names = {k.split(".")[0] for k in ckpt_module._saved_prefixes(latest)}
    assert names == {"net", "net_ema", "optim", "scheduler", "data", "rng", "trainer"}
    trainer = {"step": -1}
    ckpt_module.dcp.load({"trainer": trainer}, checkpoint_id=str(latest), planner=ckpt_module._SafeLoadPlanner(),
                         no_dist=True)
    assert trainer["step"] == 4
    # two validation images, columns: backbone decode | EMA sample | HQ target, 64 px each, 4 px padding
    train(tiny(tmp_path / "v", "run.max_steps=1", "validation.every=1", "validation.steps=2"))
    with Image.open(tmp_path / "v" / "validation" / "step_000000001.png") as grid:
        assert grid.size == (3 * 64 + 4 * 4, 2 * 64 + 3 * 4)


def test_training_after_sampling_at_the_same_size(tmp_path):
    # The position tables are cached per size; the first call for 96 x 96 happens in inference mode (as a
    # validation grid at a bucket not trained yet would), and training at that size must still backpropagate.
    from pid_decoder.model.net import PiDNet

    cfg = tiny(tmp_path).net_config
    torch.manual_seed(0)
    net = PiDNet(cfg, aux_head=True)
    lq, text = torch.randn(1, 12, 12, 12), torch.zeros(1, 8, 24)
    sample_teacher(net, lq, text, 0.0, height=96, width=96, steps=1, cfg_scale=1.0)
    v, aux = net.forward_train(torch.randn(1, 3, 96, 96), torch.full((1,), 500.0), text, lq, torch.zeros(1))
    (v.square().mean() + aux.square().mean()).backward()
    assert net.s_embedder.proj.weight.grad is not None
