"""The Python API refuses bad input with ValueError/TypeError/FileNotFoundError/PermissionError and a sentence
(parameter words), sizes upscales as asked, checks memory first, retries an out-of-memory once with half the
chunk, and writes files atomically with the umask's mode."""

from __future__ import annotations

import logging
import os
import subprocess
import time

import numpy as np
import pytest
import torch

from pid_decoder import atomic, sample, sample_teacher
from pid_decoder.io import load_latent, read_image

from .test_pipeline_support import TEXT_D, TEXT_T, make_assets, random_image

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from pid_decoder import PiDPipeline, presets

    from .test_pipeline_support import tiny_preset

    assets = make_assets(tmp_path_factory.mktemp("harden-api-assets"))
    p = tiny_preset("student")
    presets.PRESETS[p.name], presets.ALIASES[p.alias] = p, p.name
    try:
        pipe = PiDPipeline.from_pretrained(p.alias, weights_dir=assets["weights"], backbone=assets["vae"], device="cpu")
    finally:
        del presets.PRESETS[p.name], presets.ALIASES[p.alias]
    pipe.assets = assets
    return pipe


TEXT = torch.randn(TEXT_T, TEXT_D, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- decode / sample arguments
def test_decode_empty_batch_is_a_value_error(pipe):
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 16, 4, 4\)\); give at least one latent"):
        pipe.decode(torch.randn(0, 16, 4, 4), text_embedding=TEXT)


def test_decode_nan_latent_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="NaN"):
        pipe.decode(torch.full((1, 16, 2, 2), float("nan")), text_embedding=TEXT)


@pytest.mark.parametrize(("seed", "error", "message"), [
    (2**70, ValueError, r"seed must be in \[0, 2\*\*64 - 1\]"),
    (-1, ValueError, r"seed must be in \[0, 2\*\*64 - 1\]"),
    (1.5, TypeError, r"seed must be a whole number"),
    ("7", TypeError, r"seed must be a whole number"),
])
def test_decode_bad_seed(pipe, seed, error, message):
    with pytest.raises(error, match=message):
        pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=TEXT, seed=seed)


def test_decode_seed_range_covers_every_item(pipe):
    with pytest.raises(ValueError, match=r"item seeds run up to seed \+ 1"):
        pipe.decode(torch.randn(2, 16, 2, 2), text_embedding=TEXT, seed=2**64 - 1)


@pytest.mark.parametrize(("steps", "error", "message"), [
    (2.5, TypeError, r"steps must be a whole number of sampler steps, got 2\.5"),
    (True, TypeError, r"steps must be a whole number"),
    (5, ValueError, r"steps must be in 1\.\.4 for the distilled student .* got 5"),
    (1000, ValueError, r"steps must be in 1\.\.4"),
    (0, ValueError, r"steps must be in 1\.\.4"),
])
def test_sample_steps_outside_the_schedule(tiny_net, steps, error, message):
    lq, text = torch.randn(1, 16, 2, 2), torch.randn(1, 4, 24)
    with pytest.raises(error, match=message):
        sample(tiny_net, lq, text, 0.0, height=64, width=64, steps=steps)


def test_pipeline_decode_steps_outside_the_schedule(pipe):
    with pytest.raises(ValueError, match=r"1\.\.4"):
        pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=TEXT, steps=1000)


def test_teacher_steps_must_be_whole(tiny_net):
    with pytest.raises(TypeError, match="whole number"):
        sample_teacher(tiny_net, torch.randn(1, 16, 2, 2), torch.randn(1, 4, 24), 0.0, height=64, width=64, steps=2.5,
                       cfg_scale=1.0)


# --------------------------------------------------------------------------- upscale sizes
def test_plan_upscale_size_rules():
    from pid_decoder.backbones.images import plan_upscale_size

    # default: the reference's centre-crop, no resize
    assert plan_upscale_size((1000, 750), preset_scale=4) == (None, (3968, 2944), "")
    # 2x on a 4x preset: a half-size input; 2000x1500 snaps to multiples of 64
    resize, out, msg = plan_upscale_size((1000, 750), preset_scale=4, scale=2)
    assert out == (1984, 1472) and resize == (496, 368) and "2000x1500 snapped to 1984x1472" in msg
    assert plan_upscale_size((512, 256), preset_scale=4, scale=2) == ((256, 128), (1024, 512), "")
    # size and long edge (aspect kept); tiny requests still produce one multiple
    assert plan_upscale_size((300, 200), preset_scale=4, size=(3840, 2160))[1] == (3840, 2176)
    assert plan_upscale_size((300, 200), preset_scale=4, long_edge=2048)[1:] == ((2048, 1344),
                                                                               "requested output 2048x1365 snapped "
                                                                               "to 2048x1344 (this preset produces "
                                                                               "multiples of 64 px)")
    assert plan_upscale_size((10, 10), preset_scale=4, size=(5, 5))[1] == (64, 64)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scale": 8}, r"scale must be a whole number in 1\.\.4"),
    ({"scale": 2.0}, r"scale must be a whole number"),
    ({"size": (0, 10)}, r"size must be a \(width, height\) pair of positive ints"),
    ({"long_edge": -3}, r"long_edge must be a positive int"),
    ({"scale": 2, "long_edge": 100}, r"at most one of scale, size and long_edge"),
])
def test_plan_upscale_size_refuses(kwargs, message):
    from pid_decoder.backbones.images import plan_upscale_size

    with pytest.raises(ValueError, match=message):
        plan_upscale_size((100, 100), preset_scale=4, **kwargs)


def test_upscale_to_scale_size_and_long_edge(pipe, caplog):
    image = random_image(40, 24, seed=1)
    assert pipe.upscale(image, text_embedding=TEXT, steps=1)[0].size == (128, 64)  # crop 32x16, 4x
    assert pipe.upscale(image, text_embedding=TEXT, steps=1, scale=2)[0].size == (64, 64)  # 80x48 -> 64x64
    with caplog.at_level(logging.WARNING, logger="pid_decoder.backbones.images"):
        out = pipe.upscale(image, text_embedding=TEXT, steps=1, size=(100, 70))[0]
    assert out.size == (128, 64) and "requested output 100x70 snapped to 128x64" in caplog.text
    assert pipe.upscale(image, text_embedding=TEXT, steps=1, long_edge=128)[0].size == (128, 64)


def test_upscale_empty_list_is_a_value_error(pipe):
    with pytest.raises(ValueError, match="empty list of images"):
        pipe.upscale([], text_embedding=TEXT)


# --------------------------------------------------------------------------- memory
def test_memory_is_checked_before_any_compute(pipe, monkeypatch):
    from pid_decoder import memory, sampling

    monkeypatch.setattr(memory, "available_memory", lambda device: 10_000)
    monkeypatch.setattr(sampling, "sample", lambda *a, **kw: pytest.fail("computed despite the memory check"))
    with pytest.raises(memory.PiDOutOfMemoryError, match=r"64x64 needs at least .* on cpu .* size=, long_edge="):
        pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=TEXT)


def test_out_of_memory_retries_once_with_half_the_chunk(pipe, monkeypatch, caplog):
    from pid_decoder import sampling

    real, chunks = sampling.sample, []

    def flaky(*a, **kw):
        chunks.append(kw["chunk"])
        if len(chunks) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **kw)

    latent = torch.randn(1, 16, 2, 4, generator=torch.Generator().manual_seed(3))
    expected = np.asarray(pipe.decode(latent, text_embedding=TEXT, seed=4)[0]).astype(int)
    monkeypatch.setattr(sampling, "sample", flaky)
    with caplog.at_level(logging.WARNING, logger="pid_decoder.memory"):
        got = np.asarray(pipe.decode(latent, text_embedding=TEXT, seed=4)[0]).astype(int)
    assert chunks == [None, pipe._auto_chunk(64, 128) // 2]  # 32 tokens -> 16
    assert "retrying once with half the chunk (16)" in caplog.text
    assert np.abs(got - expected).max() <= 1  # same seed, same image (the chunk only changes float rounding)


def test_out_of_memory_twice_is_one_clear_error(pipe, monkeypatch):
    from pid_decoder import pipeline, sampling

    def oom(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(sampling, "sample", oom)
    with pytest.raises(pipeline.PiDOutOfMemoryError, match=r"also with half the pixel chunk.*max_memory=.*tile="):
        pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=TEXT)


# --------------------------------------------------------------------------- files: load_latent / read_image
def test_load_latent_refusals(tmp_path):
    cases = {
        "empty.pt": (torch.randn(0, 16, 4, 4), r"latent batch is empty"),
        "nan.pt": (torch.tensor([[[float("nan")]]]), r"1 NaN or infinite value"),
        "zero_grid.pt": (torch.randn(1, 16, 0, 4), r"the latent is empty"),
        "complex.pt": (torch.randn(1, 2, 2, dtype=torch.complex64), r"must be floating point"),
    }
    for name, (tensor, message) in cases.items():
        torch.save(tensor, tmp_path / name)
        with pytest.raises(ValueError, match=message):
            load_latent(tmp_path / name)
    np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"numeric array"):
        load_latent(tmp_path / "obj.npy")
    with pytest.raises(FileNotFoundError, match="latent file not found"):
        load_latent(tmp_path / "missing.pt")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_latent(tmp_path / "dir.pt")
    (tmp_path / "z.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown latent file type '\.txt'"):
        load_latent(tmp_path / "z.txt")


def test_read_image_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.png cannot be read"):
        read_image(tmp_path / "text.png")
    with pytest.raises(IsADirectoryError):
        read_image(tmp_path)


# --------------------------------------------------------------------------- atomic writes
def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o002)
    try:
        path = atomic.atomic_write_bytes(tmp_path / "a.bin", b"data")
        assert (path.stat().st_mode & 0o777) == 0o664 and path.read_bytes() == b"data"
        os.umask(0o077)
        assert (atomic.atomic_write_bytes(tmp_path / "b.bin", b"x").stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)
    assert (atomic.atomic_write_bytes(tmp_path / "c.bin", b"x", mode=0o640).stat().st_mode & 0o777) == 0o640


def test_image_and_latent_outputs_are_readable_by_others(tmp_path):
    from pid_decoder.io import save_image, save_latent

    old = os.umask(0o022)
    try:
        assert (save_image(random_image(8, 8), tmp_path / "i.png").stat().st_mode & 0o777) == 0o644
        assert (save_latent(torch.randn(1, 16, 2, 2), tmp_path / "l.safetensors").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_atomic_write_removes_its_temp_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.atomic_write(target, broken)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_clean_stale_temps_removes_only_dead_writers_files(tmp_path):
    host = atomic._host()
    dead = tmp_path / "sub" / f".x.png.{host}-{_dead_pid()}.0123abcd.tmp"
    live = tmp_path / f".y.png.{host}-{os.getppid()}.0123abcd.tmp"
    foreign_old = tmp_path / ".z.png.otherhost-1.0123abcd.tmp"
    foreign_new = tmp_path / ".w.png.otherhost-1.0123abcd.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for p in (dead, live, foreign_old, foreign_new, unrelated):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
    os.utime(foreign_old, (time.time() - 2 * atomic.STALE_TEMP_SECONDS,) * 2)
    removed = atomic.clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead, foreign_old])
    assert live.exists() and foreign_new.exists() and unrelated.exists()


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
    out = tmp_path / "o.png"
    with atomic.claim(out) as first:
        with atomic.claim(out) as second:
            assert first and not second
    assert not atomic.claim_path(out).exists()
    atomic.claim_path(out).write_text(f"{atomic._host()} {_dead_pid()}\n")  # left by a killed run
    with atomic.claim(out) as mine:
        assert mine and atomic.claim_path(out).read_text().split() == [atomic._host(), str(os.getpid())]
    atomic.claim_path(out).write_text(f"{atomic._host()} {os.getppid()}\n")  # a live process holds it
    with atomic.claim(out) as mine:
        assert not mine
    assert atomic.claim_path(out).exists()

