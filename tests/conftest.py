"""Shared fixtures: the golden conformance cases and tiny networks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_DIR = Path(os.environ.get("PID_GOLDEN_DIR") or FIXTURES / "golden")
KEYS_DIR = FIXTURES / "keys"


def golden_cases() -> list[str]:
    if not GOLDEN_DIR.is_dir():
        raise RuntimeError(f"golden case folder {GOLDEN_DIR} does not exist (PID_GOLDEN_DIR)")
    return sorted(p.name for p in GOLDEN_DIR.iterdir() if (p / "config.json").is_file())


def load_case(name: str) -> dict:
    from safetensors.torch import load_file

    folder = GOLDEN_DIR / name
    config = json.loads((folder / "config.json").read_text())
    # Clone: tensors straight from a safetensors loader can be unaligned, which perturbs low bits.
    inputs = {k: v.clone() for k, v in load_file(folder / "inputs.safetensors").items()}
    expected = load_file(folder / "expected.safetensors")
    return {"folder": folder, "config": config, "inputs": inputs, "expected": expected}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_config():
    """A tiny v1.5-style PiD config (16 latent channels, down 8, sr 4)."""
    from pid_decoder.config import LQConfig, NetConfig

    return NetConfig(
        hidden_size=32, num_groups=2, patch_depth=2, pixel_hidden_size=4, pixel_attn_hidden_size=16,
        pixel_num_groups=2, pixel_depth=1, txt_embed_dim=24, txt_max_length=8, rope_ref_h=512, rope_ref_w=512,
        lq=LQConfig(latent_channels=16, hidden_dim=8, num_res_blocks=1, padding_mode="replicate",
                    gate_type="sigma_aware_per_token", pit_inject=True),
    )


@pytest.fixture(scope="session")
def tiny_net(tiny_config):
    from pid_decoder import PiDNet

    torch.manual_seed(1234)
    return PiDNet(tiny_config).eval()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`pid-decoder ARGV` in this process: (exit code, stdout, stderr)."""
    from pid_decoder import cli

    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
