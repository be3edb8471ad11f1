"""Bad command lines and bad input files on the CLI: the right exit status, the culprit and the fix named in the
user's words (flags), no traceback, nothing written, and no model loaded or network touched before the inputs
were checked. In-process runs (``cli.main``) with the tiny test models."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch

from .conftest import run_cli
from .test_pipeline_support import TINY_ALIAS, FakeHub, make_assets, random_image, register_presets

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("harden-cli-assets"))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Tiny presets; any download goes to a recording fake hub; the text cache lives in tmp."""
    from pid_decoder import weights

    register_presets(monkeypatch)
    hub = FakeHub(tmp_path / "empty-hub")
    monkeypatch.setattr(weights, "_hub_download", hub)
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PID_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    return hub


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded (inputs must be refused first)."""
    from pid_decoder import PiDPipeline

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the inputs were refused")

    monkeypatch.setattr(PiDPipeline, "from_pretrained", classmethod(refuse))


run = run_cli


def model_args(assets) -> list:
    return ["--preset", TINY_ALIAS, "--weights-dir", assets["weights"], "--backbone-path", assets["vae"],
            "--text-embedding", assets["embedding"], "--device", "cpu", "-q"]


def latent_file(tmp_path, tensor=None, name="z.pt"):
    path = tmp_path / name
    torch.save(torch.randn(1, 16, 2, 2) if tensor is None else tensor, path)
    return path


def image_file(tmp_path, name="in.png", w=32, h=16):
    path = tmp_path / name
    random_image(w, h).save(path)
    return path


def assert_refused(code, out, err, status, *needles, out_dir=None):
    """Exit ``status``, no result on stdout, no traceback, each needle (regex) in the message, nothing written."""
    assert code == status, err
    assert out == ""
    assert "Traceback" not in err
    for needle in needles:
        assert re.search(needle, err), f"{needle!r} not in {err!r}"
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.rglob("*")), list(out_dir.rglob("*"))


# --------------------------------------------------------------------------- usage errors (exit 2)
USAGE = [
    # (extra argv, flag named, fix / explanation)
    (["--device", "tpu"], r"--device: unknown device 'tpu'", r"'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (["--device", ""], r"--device: device is empty", r"'auto', 'cpu'"),
    (["--device", "mps"], r"--device: device 'mps' requested but MPS", r"use 'cpu'"),
    (["--device", "cuda:0"], r"--device: device 'cuda:0' requested but CUDA is not available", r"use 'cpu'"),
    (["--seed", str(2**70)], r"--seed must be in \[0, 2\*\*64 - 1\]", str(2**70)),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*64 - 1\]", r"got -1"),
    (["--steps", "1000"], r"--steps 1000: the distilled student \(preset tiny-flux\) has a 4-step schedule",
     r"use --steps 1\.\.4"),
    (["--steps", "0"], r"--steps must be >= 1", r"got 0"),
    (["--tile", "100"], r"--tile must be a multiple of 16 pixels, got 100", r"smallest tile is 144 px.*--tile 144"),
    (["--tile", "64", "--tile-overlap", "-8"], r"--tile-overlap must be >= 0", r"got -8"),
    (["--sigma", "nan"], r"--sigma must be in \[0, 1\]", r"nan"),
    (["--text-encoder", ""], r"--text-encoder is empty", r"leave it out"),
    (["--max-memory", "0"], r"--max-memory: memory budget must be positive", r"got 0"),
]


@pytest.mark.parametrize(("extra", "culprit", "fix"), USAGE, ids=[" ".join(u[0]) or "empty" for u in USAGE])
def test_decode_usage_errors_exit_2(assets, tmp_path, capsys, no_load, _isolated, extra, culprit, fix):
    if extra[:2] == ["--device", "cuda:0"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if extra[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    args = model_args(assets)
    if "--device" in extra:
        i = args.index("--device")
        del args[i : i + 2]
    code, out, err = run(capsys, "decode", latent_file(tmp_path), "-o", tmp_path / "out", *args, *extra)
    assert_refused(code, out, err, 2, culprit, fix, out_dir=tmp_path / "out")
    assert len(err.strip().splitlines()) == 1 and _isolated.calls == []


def test_output_name_and_format_conflict_refused(assets, tmp_path, capsys, no_load):
    code, out, err = run(capsys, "upscale", image_file(tmp_path), "-o", tmp_path / "out.png", "--format", "jpg",
                         *model_args(assets))
    assert_refused(code, out, err, 2, r"-o .*out\.png names a \.png file but --format jpg", r"out\.jpg")
    assert not (tmp_path / "out.png").exists()


def test_output_path_that_is_a_file_refused(assets, tmp_path, capsys, no_load):
    (tmp_path / "results").write_text("not a folder")
    code, out, err = run(capsys, "decode", latent_file(tmp_path), latent_file(tmp_path, name="y.pt"), "-o",
                         tmp_path / "results", *model_args(assets))
    assert_refused(code, out, err, 2, r"-o .*results is a file", r"give a folder")


def test_checkpoint_that_is_a_folder_refused(assets, tmp_path, capsys, no_load):
    code, out, err = run(capsys, "decode", latent_file(tmp_path), "--checkpoint", tmp_path, "--config",
                         assets["config"], "--device", "cpu", "-o", tmp_path / "o")
    assert_refused(code, out, err, 2, r"--checkpoint .* is a folder", r"give the checkpoint file itself")


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--scale", "8"], r"--scale must be 1\.\.4 for this preset \(its factor is 4x\), got 8"),
        (["--size", "big"], r"--size must be WxH in pixels, e\.g\. 3840x2160"),
        (["--size", "0x100"], r"--size must be WxH with positive sizes"),
        (["--long-edge", "0"], r"--long-edge must be a positive number of pixels"),
        (["--scale", "2", "--size", "64x64"], r"--size: not allowed with argument --scale"),
    ],
    ids=["scale-too-big", "size-garbage", "size-zero", "long-edge-zero", "scale-and-size"],
)
def test_upscale_size_options_refused(assets, tmp_path, capsys, no_load, extra, culprit):
    code, out, err = run(capsys, "upscale", image_file(tmp_path), "-o", tmp_path / "o", *model_args(assets), *extra)
    assert_refused(code, out, err, 2, culprit, out_dir=tmp_path / "o")


def test_embed_bad_device_and_missing_prompt_file(tmp_path, capsys):
    code, out, err = run(capsys, "embed", "a cat", "-o", tmp_path / "e.safetensors", "--device", "tpu")
    assert_refused(code, out, err, 2, r"--device: unknown device 'tpu'")
    code, out, err = run(capsys, "embed", "--prompt-file", tmp_path / "nope.txt", "-o", tmp_path / "e.safetensors")
    assert_refused(code, out, err, 2, r"--prompt-file .*nope\.txt cannot be read")
    assert not (tmp_path / "e.safetensors").exists()


def test_generate_capture_step_out_of_range(assets, tmp_path, capsys, no_load):
    code, out, err = run(capsys, "generate", "--prompt", "a fox", "--ldm-steps", "3", "--capture-steps", "9",
                         "--preset", TINY_ALIAS, "--pid-text-embedding", assets["embedding"], "--device", "cpu",
                         "-o", tmp_path / "g")
    assert_refused(code, out, err, 2, r"--capture-steps must be in 1\.\.3", out_dir=tmp_path / "g")


# --------------------------------------------------------------------------- bad input files (exit 1)
def _evil_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"latent": Evil()}, path)
    return path


LATENTS = {
    "empty-batch": (lambda p: torch.save(torch.randn(0, 16, 4, 4), p), r"latent batch is empty"),
    "nan": (lambda p: torch.save(torch.full((1, 16, 2, 2), float("nan")), p), r"NaN or infinite"),
    "inf": (lambda p: torch.save(torch.full((16, 2, 2), float("inf")), p), r"NaN or infinite"),
    "integer": (lambda p: torch.save(torch.ones(1, 16, 2, 2, dtype=torch.int32), p), r"must be floating point"),
    "1-d": (lambda p: torch.save(torch.randn(16), p), r"\(B, C, h, w\) or \(C, h, w\), got shape \(16,\)"),
    "wrong-channels": (lambda p: torch.save(torch.randn(1, 4, 2, 2), p), r"expects latents with 16 channels, got 4"),
    "random-bytes": (lambda p: p.write_bytes(os.urandom(300)), r"not a readable torch file"),
    "empty-file": (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "not-a-tensor": (lambda p: torch.save({"a": 1, "b": "x"}, p), r"holds a dict without a 'latent' tensor"),
}


@pytest.mark.parametrize("case", sorted(LATENTS))
def test_bad_latent_file_refused_before_any_model(assets, tmp_path, capsys, no_load, _isolated, case):
    make, culprit = LATENTS[case]
    path = tmp_path / "bad.pt"
    make(path)
    code, out, err = run(capsys, "decode", path, "-o", tmp_path / "out", *model_args(assets))
    assert_refused(code, out, err, 1, r"bad\.pt", culprit, r"1 failed", out_dir=tmp_path / "out")
    assert "arbitrary" not in err and _isolated.calls == []


def test_pickle_that_would_run_code_is_refused_and_never_runs(assets, tmp_path, capsys, no_load):
    marker = tmp_path / "MARKER"
    path = _evil_pickle(tmp_path / "evil.pt", marker)
    code, out, err = run(capsys, "decode", path, "-o", tmp_path / "out", *model_args(assets))
    assert_refused(code, out, err, 1, r"evil\.pt: holds Python objects other than tensors", r"could run code",
                   r"\.safetensors", out_dir=tmp_path / "out")
    assert not marker.exists()
    # the same object as a plain pickle (not torch.save's format) is refused as not a torch file, and never runs
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"latent": torch.randn(1)}, f)
    code, out, err = run(capsys, "decode", tmp_path / "plain.pt", "-o", tmp_path / "out", *model_args(assets))
    assert_refused(code, out, err, 1, r"plain\.pt: is not a readable torch file", out_dir=tmp_path / "out")


def test_unreadable_latent_says_permission_denied(assets, tmp_path, capsys, no_load, monkeypatch):
    from pid_decoder import io as pio

    path = latent_file(tmp_path)

    def denied(file, *a, **kw):  # tests often run as root, for whom chmod 000 changes nothing
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *a, **kw)

    monkeypatch.setattr(pio, "open", denied, raising=False)
    code, out, err = run(capsys, "decode", path, "-o", tmp_path / "out", *model_args(assets))
    assert_refused(code, out, err, 1, r"z\.pt exists but cannot be read \(permission denied\)", r"permissions")
    assert "No such file" not in err


IMAGES = {
    "not-an-image": (lambda p: p.write_bytes(b"hello, I am text"), r"cannot be read \(not a complete"),
    "truncated-png": (lambda p: p.write_bytes(_png_bytes()[:-40]), r"cannot be read"),
    "empty": (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
    "too-small": (lambda p: random_image(8, 8).save(p), r"8x8 .* smaller than 16x16.*--size / --long-edge / --scale"),
}


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    random_image(32, 32).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(IMAGES))
def test_bad_image_refused_before_any_model(assets, tmp_path, capsys, no_load, _isolated, case):
    make, culprit = IMAGES[case]
    path = tmp_path / "not_an_image.png"
    make(path)
    code, out, err = run(capsys, "upscale", path, "-o", tmp_path / "out", *model_args(assets))
    assert_refused(code, out, err, 1, r"not_an_image\.png", culprit, out_dir=tmp_path / "out")
    assert _isolated.calls == []


def test_bad_input_reported_before_missing_weights(tmp_path, capsys, monkeypatch, _isolated):
    """Offline with no weights at all: the broken input is what the user hears about, at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"nope")
    code, out, err = run(capsys, "upscale", bad, "--preset", "flux-2k", "--weights-dir", tmp_path / "w",
                         "--device", "cpu", "-o", tmp_path / "out")
    assert_refused(code, out, err, 1, r"not_an_image\.png: .*cannot be read", out_dir=tmp_path / "out")
    assert "missing" not in err and "model_ema" not in err and _isolated.calls == []


# --------------------------------------------------------------------------- messages in flag words
def test_unknown_latent_space_is_said_in_flags(assets, tmp_path, capsys):
    code, out, err = run(capsys, "decode", latent_file(tmp_path), "--checkpoint", assets["checkpoint"], "--config",
                         assets["config"], "--backbone-path", assets["vae"], "--text-embedding", assets["embedding"],
                         "--device", "cpu", "-q", "-o", tmp_path / "o", "--compare")
    assert_refused(code, out, err, 2, r"--backbone NAME", out_dir=tmp_path / "o")
    assert "backbone_name=" not in err and "return_baseline" not in err


def test_checkpoint_without_config_is_said_in_flags(assets, tmp_path, capsys, monkeypatch):
    from pid_decoder import presets

    from .test_pipeline_support import TINY_PRESET

    for name in (TINY_PRESET, "PiD_tiny_test_flux_undistilled"):  # the file then matches no preset
        monkeypatch.delitem(presets.PRESETS, name)
    code, out, err = run(capsys, "decode", latent_file(tmp_path), "--checkpoint", assets["checkpoint"],
                         "--backbone", "flux", "--text-embedding", assets["embedding"], "--device", "cpu", "-q",
                         "-o", tmp_path / "o")
    assert_refused(code, out, err, 1, r"does not match any released PiD preset", r"--config FILE",
                   out_dir=tmp_path / "o")


def test_output_too_large_for_memory_is_refused_with_the_options(assets, tmp_path, capsys, monkeypatch):
    from pid_decoder import memory, sampling

    monkeypatch.setattr(memory, "available_memory", lambda device: 2**30)  # 1 GiB free
    monkeypatch.setattr(sampling, "sample", lambda *a, **kw: pytest.fail("computed despite the memory check"))
    code, out, err = run(capsys, "upscale", image_file(tmp_path), "-o", tmp_path / "o", *model_args(assets),
                         "--size", "32768x32768")
    assert_refused(code, out, err, 1, r"32768x32768 needs at least 48\.0 GiB on cpu", r"1\.0 GiB is available",
                   r"--scale, --size, --long-edge", r"--max-memory and --tile bound the network's activations",
                   out_dir=tmp_path / "o")
    assert "max_memory=" not in err


def test_out_of_memory_twice_suggests_max_memory_and_tile(assets, tmp_path, capsys, monkeypatch):
    from pid_decoder import sampling

    def oom(*a, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(sampling, "sample", oom)
    code, out, err = run(capsys, "decode", latent_file(tmp_path), "-o", tmp_path / "o", *model_args(assets))
    assert_refused(code, out, err, 1, r"out of memory decoding 64x64 on cpu, also with half the pixel chunk",
                   r"--max-memory", r"--tile N for the approximate tiled decode", out_dir=tmp_path / "o")
    assert "max_memory=" not in err


def test_seed_plus_index_beyond_64_bits_is_a_usage_error(assets, tmp_path, capsys, no_load):
    a, b = image_file(tmp_path, "a.png"), image_file(tmp_path, "b.png")
    code, out, err = run(capsys, "upscale", a, b, "-o", tmp_path / "o", *model_args(assets), "--seed", str(2**64 - 1))
    assert_refused(code, out, err, 2, r"--seed 18446744073709551615: item i uses seed \+ i", r"smaller --seed")


def test_good_inputs_still_written_when_one_is_bad(assets, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    torch.save(torch.randn(1, 16, 2, 2), folder / "good.pt")
    np.save(folder / "empty.npy", np.zeros((0, 16, 2, 2), np.float32))
    code, out, err = run(capsys, "decode", folder, "-o", tmp_path / "o", "--steps", "1", *model_args(assets))
    assert code == 1 and out.split() == [str(tmp_path / "o" / "good.png")]
    assert "empty.npy" in err and "latent batch is empty" in err and "Traceback" not in err
