"""The pid-decoder command line, end to end on CPU with tiny models (no network, no Gemma for decoding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pid_decoder import cli, sample
from pid_decoder.backbones import tensor_to_image

from .test_pipeline_support import (
    TINY_ALIAS,
    FakeHub,
    load_tiny_net,
    make_assets,
    random_image,
    register_presets,
    tiny_flux_pipeline,
)

pytest.importorskip("diffusers")

SUBCOMMANDS = ["presets", "info", "convert", "embed", "upscale", "decode", "generate", "serve"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("cli-assets"))


@pytest.fixture
def presets(monkeypatch):
    register_presets(monkeypatch)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Any weight download goes to an empty fake hub; the text cache lives in tmp."""
    from pid_decoder import weights

    monkeypatch.setattr(weights, "_hub_download", FakeHub(tmp_path / "empty-hub"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PID_WEIGHTS_DIR", raising=False)


def run(*argv, capsys=None) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors and --help
        code = exc.code
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def model_args(assets) -> list:
    """A tiny registered preset from the weights folder, the tiny VAE and a text-embedding file."""
    return ["--preset", TINY_ALIAS, "--weights-dir", assets["weights"], "--backbone-path", assets["vae"],
            "--text-embedding", assets["embedding"], "--device", "cpu", "-q"]


def file_args(assets) -> list:
    """A self-trained checkpoint: --checkpoint + --config + --backbone (works in subprocesses too)."""
    return ["--checkpoint", assets["checkpoint"], "--config", assets["config"], "--backbone", "flux",
            "--backbone-path", assets["vae"], "--text-embedding", assets["embedding"], "--device", "cpu", "-q"]


def image_folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        random_image(16 + 16 * (i % 2), 16, seed=i).save(sub / f"img{i}.png")
    return root


# --------------------------------------------------------------------------- help and listing
@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_of_every_subcommand(name, capsys):
    code, out, _ = run(name, "--help", capsys=capsys)
    assert code == 0 and "usage: pid-decoder " + name in out


def _console_script() -> list[str]:
    """The ``pid-decoder`` script of the interpreter running the tests (never another Python's on PATH)."""
    import sysconfig

    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        for name in ("pid-decoder", "pid-decoder.exe"):
            if (folder / name).is_file():
                return [str(folder / name)]
    return [sys.executable, "-m", "pid_decoder.cli"]


def test_console_script_help(monkeypatch, tmp_path):
    # a stale pid-decoder of another Python first on PATH must not be the one that runs
    stale = tmp_path / "pid-decoder"
    stale.write_text("#!/bin/sh\necho stale >&2\nexit 3\n")
    stale.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = _console_script()
    assert cmd[0] != str(stale)
    result = subprocess.run(cmd + ["decode", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "--text-embedding" in result.stdout and "--compare" in result.stdout
    result = subprocess.run(cmd + ["frobnicate"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2


def test_presets(capsys):
    code, out, _ = run("presets", capsys=capsys)
    assert code == 0 and "flux-4k" in out and "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step" in out
    code, out, _ = run("presets", "--json", capsys=capsys)
    rows = json.loads(out)
    assert code == 0 and len(rows) == 14 and all(r["weights"].startswith("checkpoints/") for r in rows)


def test_info_and_convert(assets, tmp_path, capsys):
    code, out, _ = run("info", assets["checkpoint"], capsys=capsys)
    assert code == 0 and json.loads(out)["family"] == "v1.5"
    target = tmp_path / "tiny.safetensors"
    code, out, _ = run("convert", assets["checkpoint"], target, "--config", assets["config"], capsys=capsys)
    assert code == 0 and out.strip() == str(target) and target.is_file()
    code, _, err = run("convert", assets["checkpoint"], target, "--config", assets["config"], capsys=capsys)
    assert code == 2 and "--overwrite" in err


def test_embed_with_tiny_gemma(tmp_path, capsys):
    from transformers import Gemma2ForCausalLM

    from pid_decoder.text import load_text_embedding

    from .test_text import _gemma_config, _word_level_tokenizer

    folder = tmp_path / "gemma"
    tokenizer = _word_level_tokenizer()
    torch.manual_seed(0)
    Gemma2ForCausalLM(_gemma_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out_file = tmp_path / "emb.safetensors"
    code, out, _ = run("embed", "a red cat", "-o", out_file, "--text-encoder", folder, capsys=capsys)
    assert code == 0 and out.strip() == str(out_file)
    emb, meta = load_text_embedding(out_file)
    assert emb.shape == (300, 32) and meta["prompt"] == "a red cat"


# --------------------------------------------------------------------------- upscale
@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_upscale_formats(assets, presets, tmp_path, capsys, fmt):
    src = tmp_path / "in.png"
    random_image(32, 16).save(src)
    code, out, _ = run("upscale", src, "-o", tmp_path / "out", "--format", fmt, "--steps", "1", *model_args(assets),
                       capsys=capsys)
    target = tmp_path / "out" / f"in.{fmt}"
    assert code == 0 and out.splitlines() == [str(target)]
    with Image.open(target) as im:
        assert im.size == (128, 64) and im.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16"])
def test_upscale_input_modes(assets, presets, tmp_path, capsys, mode):
    src = tmp_path / f"in_{mode.replace(';', '')}.png"
    random_image(20, 18, mode=mode).save(src)  # centre-cropped to 16x16
    out_file = tmp_path / "result.png"
    code, out, _ = run("upscale", src, "-o", out_file, "--steps", "1", *model_args(assets), capsys=capsys)
    assert code == 0 and out.strip() == str(out_file)
    with Image.open(out_file) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_upscale_jpeg_input_and_default_seed_matches_api(assets, presets, tmp_path, capsys):
    from pid_decoder import PiDPipeline

    src = tmp_path / "photo.jpg"
    random_image(16, 32, seed=4).save(src, quality=90)
    code, _, _ = run("upscale", src, "-o", tmp_path / "o", "--sigma", "0.2", *model_args(assets), capsys=capsys)
    assert code == 0
    pipe = PiDPipeline.from_pretrained(TINY_ALIAS, weights_dir=assets["weights"], backbone=assets["vae"], device="cpu")
    expected = pipe.upscale(Image.open(src), text_embedding=assets["embedding"], sigma=0.2, seed=5)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "photo.png")), np.asarray(expected))


def test_upscale_folder_keeps_relative_paths_and_resumes(assets, presets, tmp_path, capsys):
    src = image_folder(tmp_path / "in", 3)
    (src / ".hidden.png.tmp").write_bytes(b"partial")  # leftovers are not inputs
    out = tmp_path / "out"
    args = ["upscale", src, "-o", out, "--steps", "1", *model_args(assets)]
    code, stdout, _ = run(*args, capsys=capsys)
    expected = [out / "img0.png", out / "img2.png", out / "sub" / "img1.png"]
    assert code == 0 and sorted(stdout.split()) == sorted(map(str, expected))
    first = {p: p.read_bytes() for p in expected}

    # an interrupted run: one output missing, a partial temp file of it left behind
    expected[1].unlink()
    (out / ".img2.png.abc123.tmp").write_bytes(b"partial")
    code, stdout, err = run(*args[:-1], capsys=capsys)  # without -q: the summary line
    assert code == 0 and stdout.split() == [str(expected[1])]
    assert "1 written, 2 skipped" in err
    assert {p: p.read_bytes() for p in expected} == first  # same seeds per index: same bytes

    code, stdout, _ = run(*args, "--overwrite", capsys=capsys)
    assert code == 0 and len(stdout.split()) == 3


def test_upscale_corrupt_input_is_reported_and_others_written(assets, presets, tmp_path, capsys):
    src = image_folder(tmp_path / "in", 2)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, stdout, err = run("upscale", src, "-o", tmp_path / "out", "--steps", "1", *model_args(assets), capsys=capsys)
    assert code == 1
    assert len(stdout.split()) == 2 and "broken.png" in err and "1 failed" in err
    assert not (tmp_path / "out" / "broken.png").exists()


def test_upscale_compare_and_baseline(assets, presets, tmp_path, capsys):
    src = tmp_path / "x.png"
    random_image(16, 16).save(src)
    code, _, _ = run("upscale", src, "-o", tmp_path / "o", "--compare", "--save-baseline", "--steps", "1",
                     *model_args(assets), capsys=capsys)
    assert code == 0
    with Image.open(tmp_path / "o" / "x_compare.png") as im:
        assert im.size == (128, 64)
    with Image.open(tmp_path / "o" / "x_vae.png") as im:
        assert im.size == (16, 16)


# --------------------------------------------------------------------------- decode
def _write_latents(folder: Path, latent: torch.Tensor) -> dict[str, Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "st_key": folder / "a_key.safetensors",
        "st_single": folder / "b_single.safetensors",
        "pt": folder / "c_tensor.pt",
        "pt_dict": folder / "d_dict.pt",
        "npy": folder / "e_array.npy",
    }
    save_file({"latent": latent, "other": torch.zeros(2)}, files["st_key"])
    save_file({"z": latent[0]}, files["st_single"])  # 3-D
    torch.save(latent, files["pt"])
    torch.save({"latent": latent[0]}, files["pt_dict"])
    np.save(files["npy"], latent.numpy())
    return files


def test_decode_latent_formats_equal_sample(assets, tmp_path, capsys):
    from pid_decoder.text import load_text_embedding

    latent = torch.randn(1, 16, 1, 2, generator=torch.Generator().manual_seed(0))
    files = _write_latents(tmp_path / "lat", latent)
    code, stdout, _ = run("decode", tmp_path / "lat", "-o", tmp_path / "out", "--seed", "7", *file_args(assets),
                          capsys=capsys)
    assert code == 0 and len(stdout.split()) == len(files)
    # --seed S equals sample() with a CPU generator seeded S
    net = load_tiny_net(assets["checkpoint"])
    emb, _ = load_text_embedding(assets["embedding"])
    ref = sample(net, latent.to(torch.bfloat16).float(), emb[None], 0.0, height=32, width=64,
                 generator=torch.Generator().manual_seed(7))
    expected = np.asarray(tensor_to_image(ref))
    for path in files.values():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{path.stem}.png")), expected)


def _decoded(tmp_path, assets, name, *extra, capsys):
    latent = torch.randn(1, 16, 1, 2, generator=torch.Generator().manual_seed(0))
    torch.save(latent, tmp_path / "lat.pt")
    code, stdout, err = run("decode", tmp_path / "lat.pt", "-o", tmp_path / name, "--seed", "7", *file_args(assets),
                            *extra, capsys=capsys)
    assert code == 0, err
    return np.asarray(Image.open(stdout.split()[0])).astype(int)


def test_speed_and_memory_options_give_the_same_image(assets, tmp_path, capsys):
    plain = _decoded(tmp_path, assets, "plain", capsys=capsys)
    # a 1 KB budget: one patch token per pixel-pathway chunk; exact up to float rounding
    assert np.abs(_decoded(tmp_path, assets, "budget", "--max-memory", "1KB", capsys=capsys) - plain).max() <= 1
    np.testing.assert_array_equal(_decoded(tmp_path, assets, "offload", "--offload", capsys=capsys), plain)
    np.testing.assert_array_equal(_decoded(tmp_path, assets, "flash", "--attention", "flash", capsys=capsys), plain)
    # a tile as large as the output: the exact path
    np.testing.assert_array_equal(_decoded(tmp_path, assets, "onetile", "--tile", "64", "--tile-overlap", "16", capsys=capsys), plain)


def test_tile_option_is_the_tiled_decode(assets, tmp_path, capsys):
    from pid_decoder.text import load_text_embedding
    from pid_decoder.tiling import sample_tiled

    tiled = _decoded(tmp_path, assets, "tiled", "--tile", "32", "--tile-overlap", "16", capsys=capsys)
    net = load_tiny_net(assets["checkpoint"])
    emb, _ = load_text_embedding(assets["embedding"])
    latent = torch.randn(1, 16, 1, 2, generator=torch.Generator().manual_seed(0))
    ref = sample_tiled(net, latent.to(torch.bfloat16).float(), emb[None], 0.0, height=32, width=64, tile=32,
                       overlap=16, generator=torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(tiled, np.asarray(tensor_to_image(ref)).astype(int))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-memory", "lots"], "--max-memory: cannot read memory budget 'lots'"),
        (["--tile", "40"], "--tile must be a multiple of 16 pixels, got 40; the smallest tile is 144 px"),
        (["--tile", "100"], "--tile must be a multiple of 16 pixels, got 100.*Use e.g. --tile 144"),
        (["--tile", "128"], "--tile must be at least 144 pixels, got 128.*--tile-overlap 128"),
        (["--offload", "--compile"], "--offload and --compile do not combine"),
        (["--noise-device", "mps"], "--noise-device: noise device must be 'auto', 'cpu' or a CUDA device"),
    ],
)
def test_bad_speed_and_memory_options_are_usage_errors(assets, tmp_path, capsys, extra, message):
    import re

    torch.save(torch.randn(1, 16, 1, 2), tmp_path / "lat.pt")
    code, _, err = run("decode", tmp_path / "lat.pt", "-o", tmp_path / "o", *file_args(assets), *extra, capsys=capsys)
    assert code == 2 and re.search(message, err), err


def test_decode_batch_file_and_sigma(assets, tmp_path, capsys):
    latents = torch.randn(2, 16, 2, 2)
    torch.save(latents, tmp_path / "two.pt")
    code, stdout, _ = run("decode", tmp_path / "two.pt", "-o", tmp_path / "o", "--sigma", "0.5", "--steps", "1",
                          *file_args(assets), capsys=capsys)
    assert code == 0 and [Path(p).name for p in stdout.split()] == ["two_0.png", "two_1.png"]


def test_decode_compare_writes_side_by_side(assets, tmp_path, capsys):
    torch.save(torch.randn(16, 2, 2), tmp_path / "z.pt")
    code, _, _ = run("decode", tmp_path / "z.pt", "-o", tmp_path / "o", "--compare", "--steps", "1", *file_args(assets),
                     capsys=capsys)
    assert code == 0
    with Image.open(tmp_path / "o" / "z_compare.png") as im:
        assert im.size == (128, 64)


def test_decode_bad_latent_among_good(assets, tmp_path, capsys):
    folder = tmp_path / "lat"
    folder.mkdir()
    torch.save(torch.randn(1, 16, 2, 2), folder / "good.pt")
    torch.save(torch.randn(1, 4, 2, 2), folder / "wrong_channels.pt")
    (folder / "garbage.npy").write_bytes(b"nope")
    code, stdout, err = run("decode", folder, "-o", tmp_path / "o", "--steps", "1", *file_args(assets), capsys=capsys)
    assert code == 1 and [Path(p).name for p in stdout.split()] == ["good.png"]
    assert "garbage.npy" in err and "wrong_channels.pt" in err and "16 channels" in err and "2 failed" in err


def test_offline_missing_weights_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.save(torch.randn(16, 2, 2), tmp_path / "z.pt")
    code, stdout, err = run("decode", tmp_path / "z.pt", "--preset", "flux-4k", "--weights-dir", tmp_path / "w",
                            "--text-embedding", tmp_path / "z.pt", "--device", "cpu", capsys=capsys)
    assert code == 1 and stdout == ""
    # --text-embedding exists (any file) so the run reaches the weights; decode without --compare needs no VAE
    assert "checkpoints/PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step/model_ema_bf16.pth" in err
    assert "checkpoints/ae.safetensors" not in err
    code, _, err = run("upscale", tmp_path, "--preset", "flux-4k", "--weights-dir", tmp_path / "w", capsys=capsys)
    assert code == 2 and "no input files" in err  # a folder without images
    img = tmp_path / "i.png"
    random_image(32, 32).save(img)
    code, _, err = run("upscale", img, "--preset", "sdxl-4k", "--weights-dir", tmp_path / "w", "--device", "cpu",
                       capsys=capsys)
    assert code == 1
    assert "checkpoints/PiD_res2kto4k_sr4x_official_sdxl_distill_4step/model_ema_bf16.pth" in err
    assert "sdxl_vae/diffusion_pytorch_model.safetensors" in err and "stabilityai/sdxl-vae" in err


# --------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize(
    "argv, message",
    [
        (["decode", "missing.pt"], "input not found"),
        (["decode", "{lat}", "--preset", "nope"], "unknown preset"),
        (["decode", "{lat}", "--config", "{cfg}"], "--config describes a --checkpoint"),
        (["decode", "{lat}", "--sigma", "2"], "--sigma must be in"),
        (["decode", "{lat}", "{lat}", "-o", "x.png"], "would both write"),
        (["decode", "{lat}", "--prompt", "a", "--text-embedding", "{lat}"], "not both"),
        (["generate", "--preset", TINY_ALIAS], "give --prompt"),
        (["generate", "--prompt", "a", "--resolution", "a,b"], "--resolution"),
        (["upscale", "{lat}", "--format", "gif"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv, message, assets, tmp_path, capsys, presets):
    lat = tmp_path / "l.pt"
    torch.save(torch.randn(16, 2, 2), lat)
    argv = [a.format(lat=lat, cfg=assets["config"]) for a in argv]
    code, _, err = run(*argv, capsys=capsys)
    assert code == 2 and message in err


def test_runtime_error_exit_1(assets, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    torch.save(torch.randn(16, 2, 2), tmp_path / "z.pt")
    code, _, err = run("decode", tmp_path / "z.pt", "--checkpoint", bad, "--config", assets["config"], "--backbone",
                       "flux", "--text-embedding", assets["embedding"], "--device", "cpu", "-q", capsys=capsys)
    assert code == 1 and "error:" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- generate
def test_generate_with_tiny_flux_pipeline(assets, presets, tmp_path, capsys, monkeypatch):
    from diffusers import AutoencoderKL

    from pid_decoder import ldm as ldm_module

    ldm = tiny_flux_pipeline(AutoencoderKL.from_pretrained(assets["vae"]))
    loaded = []

    def fake_loader(model, *, device, dtype):
        loaded.append(model)
        return ldm

    monkeypatch.setattr(ldm_module, "load_ldm_pipeline", fake_loader)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\na blue bird\n", encoding="utf-8")
    argv = ["generate", "--prompt-file", prompts, "--resolution", "128,64", "--ldm-steps", "3", "--capture-steps",
            "2", "--compare", "-o", tmp_path / "gen", "--steps", "1", "--preset", TINY_ALIAS, "--weights-dir",
            assets["weights"], "--pid-text-embedding", assets["embedding"], "--device", "cpu", "-q"]
    code, stdout, _ = run(*argv, capsys=capsys)
    names = sorted(str(Path(p).relative_to(tmp_path / "gen")) for p in stdout.split())
    assert code == 0 and loaded == ["black-forest-labs/FLUX.1-dev"]
    assert names == ["0000_a_red_fox/step_2.png", "0000_a_red_fox/x0.png", "0001_a_blue_bird/step_2.png",
                     "0001_a_blue_bird/x0.png"]
    with Image.open(tmp_path / "gen" / "0000_a_red_fox" / "x0.png") as im:
        assert im.size == (128, 64)
    with Image.open(tmp_path / "gen" / "0001_a_blue_bird" / "x0_compare.png") as im:
        assert im.size == (256, 64)
    code, stdout, _ = run(*argv, capsys=capsys)  # resumed: nothing to do
    assert code == 0 and stdout == ""


def test_teacher_preset_with_negative_embedding(assets, presets, tmp_path, capsys):
    torch.save(torch.randn(16, 1, 2), tmp_path / "z.pt")
    argv = ["decode", tmp_path / "z.pt", "-o", tmp_path / "o", "--preset", "tiny-flux-teacher", "--weights-dir",
            assets["weights"], "--text-embedding", assets["embedding"], "--negative-embedding", assets["embedding"],
            "--device", "cpu", "-q"]
    code, stdout, _ = run(*argv, capsys=capsys)
    assert code == 0 and stdout.strip() == str(tmp_path / "o" / "z.png")
    with Image.open(tmp_path / "o" / "z.png") as im:
        assert im.size == (64, 32)
