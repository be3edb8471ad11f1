"""Conformance numbers on any device: rel-L2 of our outputs against the golden cases, per case and dtype.

    python bench/parity.py --device cuda --dtypes fp32 bf16
    python bench/parity.py --golden ../shared/golden --device cpu

For every PiD case: one network evaluation ("forward") and the 4-step student sample with the case's stored
noise ("sample"), in each dtype. Prints one JSON line per case and dtype; exit 1 if a float32 result exceeds
rel-L2 1e-5 or a bf16 forward exceeds 5e-2 (the thresholds of tests/test_golden.py). float32 on CUDA runs
without TF32 (cuBLAS and cuDNN), as exact float32 requires.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pid_decoder import load_network, sample  # noqa: E402
from pid_decoder.config import NetConfig  # noqa: E402

LIMITS = {"fp32": {"forward": 1e-5, "sample": 1e-5}, "bf16": {"forward": 5e-2}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double()).norm() / b.double().norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", type=Path, default=ROOT / "tests" / "fixtures" / "golden")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    failed = False
    for folder in sorted(p for p in args.golden.iterdir() if (p / "config.json").is_file()):
        config = json.loads((folder / "config.json").read_text())
        if config["kind"] != "pid":
            continue
        inp = {k: v.clone().to(device) for k, v in load_file(folder / "inputs.safetensors").items()}
        expected = load_file(folder / "expected.safetensors")
        net_config = NetConfig.from_reference(config["net"])
        for name in args.dtypes:
            net = load_network(folder / "model_ema_bf16.pth", net_config, dtype=DTYPES[name], device=device)
            with torch.inference_mode():
                out = net(inp["x_t"], inp["t_scaled"], inp["y"], inp["lq_latent"], inp["degrade_sigma"])
                H, W = inp["x_t"].shape[-2:]
                img = sample(net, inp["lq_latent"], inp["y"], inp["degrade_sigma"], height=H, width=W,
                             noise=inp["noise"], step_noise=list(inp["sde_eps"]))
            errors = {"forward": rel_l2(out, expected["forward"]), "sample": rel_l2(img, expected["sample"])}
            ok = all(errors[k] <= limit for k, limit in LIMITS[name].items())
            failed |= not ok
            print(json.dumps({"case": folder.name, "device": str(device), "dtype": name, "ok": ok,
                              **{k: float(f"{v:.3g}") for k, v in errors.items()}}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
