"""Weight files for the backbones: shipped configs, reading state dicts, strict key/shape checks.

Every loader ends in `load_checked`, which names each missing, unexpected or mis-shaped tensor before
anything is loaded, so a file for another VAE fails with a message instead of a garbled latent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .. import weights as hub
from ..checkpoints import check_weight_path, file_kind, load_tensor_file
from ..keys import key_problems

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_config(file_name: str) -> dict[str, Any]:
    """A diffusers config shipped in `backbones/configs/`, without the `_comment` note."""
    with open(CONFIG_DIR / file_name, encoding="utf-8") as f:
        config = json.load(f)
    config.pop("_comment", None)
    return config


def read_config(config: str | os.PathLike | dict | None, default_file: str) -> dict[str, Any]:
    """`config` as a dict: a dict, a JSON file, a folder holding config.json, or None for the shipped default."""
    if config is None:
        return shipped_config(default_file)
    if isinstance(config, dict):
        return dict(config)
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"config file {str(p)!r} does not exist; pass a JSON file, a folder with config.json or a dict"
        )
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except PermissionError:
        raise PermissionError(f"cannot read config file {str(p)!r}: permission denied") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"config file {str(p)!r} is not a valid JSON file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a JSON object, got a {type(data).__name__}")
    return data


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline(repo: str, filename: str) -> bool:
    """True when downloads are off, or when one short probe finds the hub unreachable: the caller then loads
    from the Hugging Face cache only, instead of letting diffusers/transformers retry every file for minutes."""
    if offline():
        return True
    try:
        hub._hub_probe(repo, filename)  # looked up on the module: tests stand in for the hub
    except hub.HubUnreachable as err:
        logger.info("the hub could not be reached (%s): loading %s from the local cache only", err, repo)
        return True
    except Exception as err:  # an answer about the repo (404, gated): from_pretrained reports it in full
        logger.debug("hub probe for %s: %s", repo, err)
    return False


def missing_file(what: str, path: str | os.PathLike, backbone: str, needs: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} for backbone {backbone!r} not found at {str(path)!r}. It needs {needs}.")


def read_tensor_file(path: str | os.PathLike, backbone: str, needs: str) -> Any:
    """The object in a weight file, read without unpickling code; the format is told by the first bytes.

    .safetensors -> dict of tensors; torch.save files -> whatever tensors/dicts they hold (weights_only=True).
    A missing file is a FileNotFoundError, an unreadable one a PermissionError, anything else (empty, a
    directory, an image, a plain pickle, corrupt) a ValueError naming the cause and what the backbone needs.
    """
    p = Path(path)
    if not p.exists():
        raise missing_file("weight file", p, backbone, needs)
    try:
        head = check_weight_path(p, f"{backbone} weight file", flag="--backbone-path", param="path")
    except ValueError as err:
        raise ValueError(f"{err}. It needs {needs}.") from None
    kind = file_kind(head, p.stat().st_size)
    if kind == "safetensors" or (kind != "pickle" and kind not in ("zip", "torch-legacy") and p.suffix == ".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as err:  # safetensors' own error types for malformed files
            looks = "" if kind == "safetensors" else f" (it looks like {kind})"
            raise ValueError(
                f"backbone {backbone!r}: {str(p)!r} is not a valid safetensors file{looks}: {err}. It needs {needs}."
            ) from None
    if kind in ("zip", "torch-legacy"):
        try:
            return load_tensor_file(p, kind)
        except ValueError as err:
            raise ValueError(f"backbone {backbone!r}: {err}. It needs {needs}.") from None
    if kind == "pickle":
        raise ValueError(
            f"backbone {backbone!r}: {str(p)!r} is a plain Python pickle, not a torch.save or safetensors weight file; "
            f"it is not opened because unpickling can run code. It needs {needs}."
        )
    raise ValueError(f"backbone {backbone!r}: {str(p)!r} is not a weight file (it looks like {kind}). It needs {needs}.")


def read_state_dict(path: str | os.PathLike, backbone: str, needs: str) -> dict[str, torch.Tensor]:
    """A flat tensor dict from .safetensors or a torch.save file (weights_only) on the CPU; a ``state_dict`` /
    ``model`` / ``module`` wrapper is unwrapped."""
    state = read_tensor_file(path, backbone, needs)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and len(state) <= 3:
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone {backbone!r}: {str(path)!r} does not hold a flat dict of tensors. It needs {needs}.")
    if not state:
        raise ValueError(f"backbone {backbone!r}: {str(path)!r} holds no tensors. It needs {needs}.")
    return state


def load_checked(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    backbone: str,
    *,
    ignore_unexpected: tuple[str, ...] = (),
) -> None:
    """Load `state` into `model` strictly after naming every key and shape that does not line up."""
    expected = model.state_dict()
    problems = key_problems(
        {k: tuple(v.shape) for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in state.items()},
        ignore_unexpected=ignore_unexpected,
    )
    if problems:
        raise ValueError(
            f"{source!r} does not match the {backbone} backbone ({'; '.join(problems)}). "
            f"Is this the weight file of another VAE? Check --backbone / load_backbone({backbone!r}, ...)."
        )
    state = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=True)


def is_ldm_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for BFL / original-LDM VAE naming (`encoder.down.0.block.0...`), False for diffusers naming."""
    return any(".down.0.block." in k or k.startswith(("first_stage_model.", "encoder.down.")) for k in state)


def is_wan_2d_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for the reference's 2-D port of the Wan / Qwen-Image VAE (`encoder.downsamples.0.residual...`)."""
    return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.", "decoder.middle.")) for k in state)


def find_file(folder: Path, candidates: tuple[str, ...]) -> Path | None:
    """The first of `candidates` (paths relative to `folder`) that exists."""
    for rel in candidates:
        if (folder / rel).is_file():
            return folder / rel
    return None


def diffusers_folder(path: Path) -> Path | None:
    """`path` or `path/vae` when it is a diffusers model folder (config.json plus weights)."""
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*")):
            return folder
    return None


def load_pretrained_encoder(model_class: Any, folder: Path | None, repo: str, label: str, where: str) -> torch.nn.Module:
    """A transformers encoder from a local snapshot folder, or from the hub repo when ``folder`` is None."""
    source = str(folder) if folder is not None else repo
    try:
        local = folder is not None or hub_offline(repo, "config.json")
        return model_class.from_pretrained(source, local_files_only=local)
    except OSError as err:
        raise FileNotFoundError(
            f"{label} encoder not found ({source}): {err}. Put the snapshot of {repo} in an encoder/ folder {where}."
        ) from err
