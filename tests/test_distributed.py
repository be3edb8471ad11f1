"""`torchrun` data parallelism of the CLI: 2 CPU ranks on gloo shard a folder and write what one process writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pid_decoder import cli
from pid_decoder.distributed import Context, init, rank_device

from .test_pipeline_support import make_assets, random_image

pytest.importorskip("diffusers")


def test_shard_is_strided_over_sorted_items():
    assert Context(0, 2, 0, "gloo").shard(5) == [0, 2, 4]
    assert Context(1, 2, 1, "gloo").shard(5) == [1, 3]
    assert Context().shard(3) == [0, 1, 2]


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init("cpu")
    assert not ctx.enabled and ctx.world == 1 and rank_device("auto", ctx) == "auto"


def test_torchrun_two_cpu_ranks(tmp_path, capsys):
    assets = make_assets(tmp_path / "assets")
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        random_image(16, 16, seed=i).save(src / ("sub" if i % 2 else "") / f"im{i}.png")
    common = ["--checkpoint", assets["checkpoint"], "--config", assets["config"], "--backbone", "flux",
              "--backbone-path", assets["vae"], "--text-embedding", assets["embedding"], "--device", "cpu",
              "--steps", "1", "--sigma", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "pid_decoder.cli", "upscale", str(src), "-o", str(tmp_path / "multi"), *map(str, common)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(result.stdout.split())
    assert len(written) == 5 and len(set(written)) == 5  # every item exactly once over both ranks
    assert "5 written, 0 skipped (already there), 0 failed on 2 ranks" in result.stderr

    # one process writes the same bytes: seeds follow the global index, not the rank's
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "single"), "-q", *map(str, common)]) == 0
    capsys.readouterr()
    for path in written:
        rel = os.path.relpath(path, tmp_path / "multi")
        with open(path, "rb") as a, open(tmp_path / "single" / rel, "rb") as b:
            assert a.read() == b.read(), rel
