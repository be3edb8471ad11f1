"""Two gloo processes under torchrun (DDP, and FSDP2) compute what one process computes with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pid_decoder.training.checkpoint import CheckpointManager, read_tensors
from pid_decoder.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny-cpu.toml"
STEPS = 3


def overrides(run_dir: Path, batch: int, parallel: str) -> list[str]:
    # No latent noise and no dropout: every sample then has the same aux-loss weight, so the mean of the ranks'
    # losses is the one-process loss (DDP and FSDP2 average the ranks' gradients, as the reference's DDP does).
    return [
        f"run.dir={json.dumps(str(run_dir))}", f"data.path={json.dumps(str(TINY.parent / 'tiny-data'))}",
        f"data.batch_size={batch}", f"run.parallel={json.dumps(parallel)}", f"run.max_steps={STEPS}",
        "validation.every=2", "validation.steps=2", "checkpoint.every=100", "log.every=1", "log.tensorboard=false",
        "log.progress=false", "conditioning.noise_prob=0.0", "conditioning.lq_dropout=0.0", "optim.warmup_steps=0",
        "optim.lr=1e-3",
    ]


SCRIPT = """
import json, sys
from pid_decoder.training.config import load_config
from pid_decoder.training.trainer import train
from pid_decoder.training.distributed import init_distributed, shutdown
info = init_distributed("cpu")
for mode, run_dir in json.loads(sys.argv[1]).items():
    sets = json.loads(sys.argv[3])[mode]
    if mode == "fsdp":  # stop after step 2, then resume: sharded model, optimizer and EMA go through a checkpoint
        train(load_config(sys.argv[2], sets + ["run.max_steps=2"]), info=info)
        train(load_config(sys.argv[2], sets), info=info, resume=True)
    else:
        train(load_config(sys.argv[2], sets), info=info)
shutdown(info)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Rank-pair runs (DDP, FSDP2: batch 2 per rank; FSDP2 stopped after step 2 and resumed) in one torchrun launch,
    and a one-process run (batch 4)."""
    tmp = tmp_path_factory.mktemp("dist")
    dirs = {"ddp": tmp / "ddp", "fsdp": tmp / "fsdp"}
    script = tmp / "two_ranks.py"
    script.write_text(textwrap.dedent(SCRIPT))
    sets = {mode: overrides(d, batch=2, parallel=mode) for mode, d in dirs.items()}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps({k: str(v) for k, v in dirs.items()}), str(TINY), json.dumps(sets)]
    result = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    from pid_decoder.training.trainer import train

    threads = torch.get_num_threads()
    try:
        dirs["single"] = tmp / "single"
        train(load_config(TINY, overrides(dirs["single"], batch=4, parallel="single")))
    finally:
        torch.set_num_threads(threads)
    return dirs


def final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    latest = CheckpointManager(run_dir).latest()
    assert latest is not None and latest.name.endswith(f"{STEPS:09d}")
    return {entry: read_tensors(latest, entry) for entry in ("net", "net_ema")}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(runs, mode):
    one, two = final_weights(runs["single"]), final_weights(runs[mode])
    for entry in ("net", "net_ema"):
        assert one[entry].keys() == two[entry].keys()
        for name, value in one[entry].items():
            # FSDP2 stores the 0-d gate parameters as (1,) tensors
            torch.testing.assert_close(two[entry][name].reshape(value.shape), value, rtol=1e-4, atol=2e-6,
                                       msg=f"{mode} {entry} {name}")
    assert len(losses(runs[mode])) == STEPS
    assert losses(runs[mode]) == pytest.approx(losses(runs["single"]), rel=1e-5)
    assert json.loads((CheckpointManager(runs[mode]).latest() / "meta.json").read_text())["world"] == 2


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank_zero_writes_the_validation_grid(runs, mode):
    assert sorted(p.name for p in (runs[mode] / "validation").iterdir()) == ["step_000000002.png"]
