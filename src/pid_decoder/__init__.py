"""pid-decoder: PiD, the Pixel Diffusion Decoder.

Only the public API lives here. Names are imported lazily so that ``import pid_decoder`` is cheap and
never imports diffusers or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "NetConfig": "config",
    "LQConfig": "config",
    "SamplerConfig": "config",
    "Preset": "presets",
    "PRESETS": "presets",
    "ALIASES": "presets",
    "resolve_preset": "presets",
    "PiDNet": "model.net",
    "set_attention_backend": "model.attention",
    "build_network": "checkpoints",
    "load_network": "checkpoints",
    "save_safetensors": "checkpoints",
    "detect_variant": "checkpoints",
    "sample": "sampling",
    "sample_teacher": "sampling",
    "student_t_list": "sampling",
    "teacher_time_grid": "sampling",
    "dynamic_shift": "sampling",
    "load_backbone": "backbones",
    "TextEncoder": "text",
    "load_text_embedding": "text",
    "save_text_embedding": "text",
    "PiDPipeline": "pipeline",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


# Submodules reachable as attributes (``pid_decoder.io.load_latent``) without importing them up front.
_SUBMODULES = {"accel", "backbones", "checkpoints", "io", "presets", "sampling", "text", "tiling", "weights"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pid_decoder' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .backbones import load_backbone
    from .checkpoints import build_network, detect_variant, load_network, save_safetensors
    from .config import LQConfig, NetConfig, SamplerConfig
    from .model.attention import set_attention_backend
    from .model.net import PiDNet
    from .pipeline import PiDPipeline
    from .presets import ALIASES, PRESETS, Preset, resolve_preset
    from .sampling import dynamic_shift, sample, sample_teacher, student_t_list, teacher_time_grid
    from .text import TextEncoder, load_text_embedding, save_text_embedding
