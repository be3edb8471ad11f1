"""Batches under stress: a full disk stops the batch at once, a run killed with SIGKILL leaves nothing that the
next run does not clean up and finish, two runs on one folder split the work, and an out-of-memory item is
retried once with half the chunk. Tiny models; two real subprocesses where a real process must die or race."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pid_decoder
from pid_decoder import atomic

from .conftest import run_cli
from .test_pipeline_support import FakeHub, make_assets, random_image

pytest.importorskip("diffusers")

RUNNER = '''
import os, sys, time
from pid_decoder import atomic, io
mode = os.environ["PID_TEST_MODE"]
if mode == "kill":  # SIGKILL ourselves once the second output's temporary file is complete, before its rename
    real_fsync, count = atomic._fsync_file, [0]
    def fsync_then_die(path):
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), 9)
        real_fsync(path)
    atomic._fsync_file = fsync_then_die
elif mode == "slow":  # make items take long enough for two runs to overlap
    real_save = io.save_image
    def slow_save(*a, **kw):
        time.sleep(0.3)
        return real_save(*a, **kw)
    io.save_image = slow_save
from pid_decoder.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("harden-batch-assets"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    from pid_decoder import weights

    monkeypatch.setattr(weights, "_hub_download", FakeHub(tmp_path / "empty-hub"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PID_WEIGHTS_DIR", raising=False)


def file_args(assets) -> list[str]:
    """A checkpoint + config + backbone: works in subprocesses (no registered preset needed)."""
    return ["--checkpoint", str(assets["checkpoint"]), "--config", str(assets["config"]), "--backbone", "flux",
            "--backbone-path", str(assets["vae"]), "--text-embedding", str(assets["embedding"]), "--device", "cpu",
            "--steps", "1"]


def latents(folder: Path, n: int) -> Path:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        torch.save(torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(i)), folder / f"lat{i}.pt")
    return folder


def latent_args(assets) -> list[str]:
    """Decoding without baselines needs no VAE: the fastest run for subprocesses."""
    args = file_args(assets)
    i = args.index("--backbone-path")
    return args[:i] + args[i + 2 :]


def images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        random_image(16, 16, seed=i).save(folder / f"img{i}.png")
    return folder


run = run_cli


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(pid_decoder.__file__).resolve().parents[1])  # the code under test, wherever it lives
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", PID_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return env


def start(tmp_path: Path, mode: str, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, *argv], env={**subprocess_env(tmp_path),
                            "PID_TEST_MODE": mode}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------- disk full
def test_disk_full_stops_the_batch_at_once(assets, tmp_path, capsys, monkeypatch):
    from pid_decoder.pipeline import PiDPipeline

    src, out = images(tmp_path / "in", 4), tmp_path / "out"
    computed = []
    real_sample = PiDPipeline._sample_once

    def counting(self, *a, **kw):
        computed.append(1)
        return real_sample(self, *a, **kw)

    real_fsync, writes = atomic._fsync_file, []

    def full_disk(path):
        writes.append(path)
        if len(writes) >= 2:
            raise OSError(28, "No space left on device", str(path))
        real_fsync(path)

    monkeypatch.setattr(PiDPipeline, "_sample_once", counting)
    monkeypatch.setattr(atomic, "_fsync_file", full_disk)
    code, stdout, err = run(capsys, "upscale", src, "-o", out, *file_args(assets))
    assert code == 1 and stdout.split() == [str(out / "img0.png")]
    assert f"no space left writing {out / 'img1.png'}" in err and "free some space" in err
    assert "1 written, 0 skipped (already there), 0 failed; stopped: disk full" in err
    assert len(computed) == 2  # items 3 and 4 were not computed
    assert sorted(p.name for p in out.iterdir()) == ["img0.png"]  # no temp file, no claim left behind
    assert "Traceback" not in err


# --------------------------------------------------------------------------- kill -9, then the same command again
def test_killed_run_is_cleaned_up_and_finished_by_the_next(assets, tmp_path, capsys):
    src, out = latents(tmp_path / "in", 3), tmp_path / "out"
    argv = ["decode", str(src), "-o", str(out), *latent_args(assets), "-q"]
    proc = start(tmp_path, "kill", argv)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert stdout.split() == [str(out / "lat0.png")]
    left = leftovers(out)
    assert len(left) == 2 and any(n.endswith(".claim") for n in left) and any(n.endswith(".tmp") for n in left)

    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert sorted(stdout.split()) == [str(out / "lat1.png"), str(out / "lat2.png")]
    assert leftovers(out) == []
    # the outputs are those of an uninterrupted run
    code, _, err = run(capsys, "decode", src, "-o", tmp_path / "clean", *latent_args(assets), "-q")
    assert code == 0, err
    for name in ("lat0.png", "lat1.png", "lat2.png"):
        with Image.open(out / name) as a, Image.open(tmp_path / "clean" / name) as b:
            assert a.size == (64, 64)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stale_files_of_a_dead_run_are_removed_even_when_nothing_is_left_to_do(assets, tmp_path, capsys):
    src, out = images(tmp_path / "in", 1), tmp_path / "out"
    code, _, _ = run(capsys, "upscale", src, "-o", out, *file_args(assets), "-q")
    assert code == 0
    proc = subprocess.Popen(["true"])
    proc.wait()
    (out / f".img0.png.{atomic._host()}-{proc.pid}.0123abcd.tmp").write_bytes(b"partial")
    (out / ".img0.png.claim").write_text(f"{atomic._host()} {proc.pid}\n")
    code, stdout, err = run(capsys, "upscale", src, "-o", out, *file_args(assets))
    assert code == 0 and stdout == "" and "0 written, 1 skipped" in err
    assert leftovers(out) == []


def test_an_item_claimed_by_a_live_run_is_left_to_it(assets, tmp_path, capsys):
    src, out = images(tmp_path / "in", 2), tmp_path / "out"
    out.mkdir()
    (out / ".img0.png.claim").write_text(f"{atomic._host()} {os.getppid()}\n")  # a live process is on it
    code, stdout, err = run(capsys, "upscale", src, "-o", out, *file_args(assets))
    assert code == 0 and stdout.split() == [str(out / "img1.png")]
    assert "1 written, 0 skipped (already there), 0 failed, 1 left to another run" in err
    assert (out / ".img0.png.claim").exists() and not (out / "img0.png").exists()


# --------------------------------------------------------------------------- two runs, one folder
def test_two_concurrent_runs_split_the_folder(assets, tmp_path):
    n = 6
    src, out = latents(tmp_path / "in", n), tmp_path / "out"
    argv = ["decode", str(src), "-o", str(out), *latent_args(assets)]
    procs = [start(tmp_path, "slow", argv) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    written = [r[0].split() for r in results]
    everything = sorted(str(out / f"lat{i}.png") for i in range(n))
    assert sorted(written[0] + written[1]) == everything  # every item computed exactly once
    assert leftovers(out) == []
    for path in everything:
        with Image.open(path) as im:
            im.load()
            assert im.size == (64, 64)
    summaries = [r[1].strip().splitlines()[-1] for r in results]
    done = sum(int(s.split(":")[1].split()[0]) for s in summaries)
    assert done == n, summaries


# --------------------------------------------------------------------------- out of memory
def test_out_of_memory_item_is_retried_with_half_the_chunk(assets, tmp_path, capsys, monkeypatch):
    import torch

    from pid_decoder import sampling

    real, calls = sampling.sample, []

    def flaky(*a, **kw):
        calls.append(kw["chunk"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "sample", flaky)
    src = images(tmp_path / "in", 1)
    code, stdout, err = run(capsys, "upscale", src / "img0.png", "-o", tmp_path / "o.png", *file_args(assets))
    assert code == 0 and stdout.split() == [str(tmp_path / "o.png")]
    assert "out of memory decoding 64x64 on cpu" in err and "retrying once with half the chunk (8)" in err
    assert calls == [None, 8]


def test_disk_full_when_claiming_stops_before_any_compute(assets, tmp_path, capsys, monkeypatch):
    from pid_decoder.pipeline import PiDPipeline

    def full(path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "try_claim", full)
    monkeypatch.setattr(PiDPipeline, "from_pretrained", classmethod(lambda *a, **kw: pytest.fail("loaded")))
    src, out = latents(tmp_path / "in", 2), tmp_path / "out"
    code, stdout, err = run(capsys, "decode", src, "-o", out, *latent_args(assets))
    assert code == 1 and stdout == ""
    assert f"no space left writing {out / 'lat0.png'}" in err and "stopped: disk full" in err
