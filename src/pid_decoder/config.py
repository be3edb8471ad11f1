"""Frozen configuration dataclasses: the network (`NetConfig`) and the sampler (`SamplerConfig`).

`NetConfig` uses the reference's constructor argument names where they exist, so a reference `PidNet(...)`
keyword dict maps onto it field for field (`NetConfig.from_reference`). Derived sizes are properties.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

GATE_TYPES = ("sigma_aware_per_token", "sigma_aware_per_token_per_dim")
PADDING_MODES = ("zeros", "replicate", "reflect", "circular")
ROPE_MODES = ("ntk_aware", "original")

# Reference constructor arguments that only matter for training or for paths no released
# checkpoint uses. They are accepted (and ignored) when they hold their inference value.
_REFERENCE_IGNORED = {
    "num_text_blocks",  # stored but unused by the reference network
    "repa_encoder_index",  # records an internal tensor for REPA training only
    "zero_init_lq",  # initialisation only
    "train_lq_proj_only",  # freezing only
    "lq_aux_rgb_head_latent_block_idx",  # training-only auxiliary head
    "ed_depth_per_stage",
    "ed_window_size",
    "ed_num_heads",
    "ed_hidden_size",
    "ed_use_token_shuffle",
}
# Reference arguments that must hold exactly this value: anything else selects a path this
# inference implementation does not have.
_REFERENCE_REQUIRED = {
    "enable_ed": False,
    "ed_compress_ratio": 1,
    "lq_inject_mode": "controlnet",
    "lq_in_channels": 0,
}


_FIELD_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_types(obj: Any) -> None:
    """Every plain field holds its annotated type (a JSON config may say "1536" or 1536.0 or true)."""
    for f in dataclasses.fields(obj):
        allowed = _FIELD_TYPES.get(str(f.type))
        value = getattr(obj, f.name)
        if allowed is None:
            continue
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise TypeError(
                f"{type(obj).__name__}.{f.name} must be {'a' if f.type != 'int' else 'an'} {f.type}, "
                f"got {type(value).__name__} {value!r}"
            )


@dataclass(frozen=True)
class LQConfig:
    """The latent conditioning branch (LQ projection + gates) of a PiD net."""

    latent_channels: int = 16
    hidden_dim: int = 512
    num_res_blocks: int = 4
    unpatchify_factor: int = 1
    padding_mode: str = "zeros"
    gate_type: str = "sigma_aware_per_token_per_dim"
    interval: int = 2
    sr_scale: int = 4
    latent_down_factor: int = 8
    pit_inject: bool = False
    aux_rgb_head: bool = False  # training-only head; its weights are accepted and dropped

    def __post_init__(self) -> None:
        _check_types(self)
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"lq gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"lq padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        for name in ("latent_channels", "hidden_dim", "unpatchify_factor", "interval", "sr_scale", "latent_down_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"lq {name} must be >= 1, got {getattr(self, name)}")
        if self.latent_channels % self.unpatchify_factor**2:
            raise ValueError(
                f"lq latent_channels ({self.latent_channels}) must be divisible by unpatchify_factor^2 "
                f"({self.unpatchify_factor**2})"
            )
        if self.latent_down_factor % self.unpatchify_factor:
            raise ValueError("lq latent_down_factor must be divisible by unpatchify_factor")
        if self.hidden_dim % 4:
            raise ValueError(f"lq hidden_dim must be divisible by 4 (GroupNorm with 4 groups), got {self.hidden_dim}")

    @property
    def conv_latent_channels(self) -> int:
        """Channels after the latent unpatchify (FLUX.2 v1.5: 128 -> 32)."""
        return self.latent_channels // self.unpatchify_factor**2

    @property
    def pixels_per_latent(self) -> int:
        """Output pixels per latent cell along each axis (down factor x super-resolution)."""
        return self.latent_down_factor * self.sr_scale


@dataclass(frozen=True)
class NetConfig:
    """Hyper-parameters of a PiD network (or, with ``lq=None``, the text-to-image PixelDiT)."""

    hidden_size: int = 1536
    num_groups: int = 24  # attention heads of the patch blocks
    patch_depth: int = 14
    patch_size: int = 16
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int = 1152
    pixel_num_groups: int = 16
    pixel_depth: int = 2
    in_channels: int = 3
    txt_embed_dim: int = 2304
    txt_max_length: int = 300
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    rope_mode: str = "ntk_aware"
    rope_ref_h: int = 1024
    rope_ref_w: int = 1024
    lq: LQConfig | None = field(default_factory=LQConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.lq is not None and not isinstance(self.lq, LQConfig):
            raise TypeError(f"NetConfig.lq must be an LQConfig or None, got {type(self.lq).__name__}")
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {ROPE_MODES}, got {self.rope_mode!r}")
        if self.hidden_size % self.num_groups or (self.hidden_size // self.num_groups) % 4:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) / num_groups ({self.num_groups}) must be an integer "
                "head dim divisible by 4 (2-D RoPE)"
            )
        if self.pixel_attn_hidden_size % self.pixel_num_groups or self.pixel_head_dim % 4:
            raise ValueError(
                f"pixel_attn_hidden_size ({self.pixel_attn_hidden_size}) / pixel_num_groups "
                f"({self.pixel_num_groups}) must be an integer head dim divisible by 4"
            )
        if self.pixel_hidden_size % 4:
            raise ValueError(f"pixel_hidden_size must be divisible by 4 (sin-cos table), got {self.pixel_hidden_size}")
        if min(self.patch_depth, self.pixel_depth, self.patch_size, self.txt_max_length) < 1:
            raise ValueError("patch_depth, pixel_depth, patch_size and txt_max_length must be >= 1")
        if self.rope_ref_h < self.patch_size or self.rope_ref_w < self.patch_size:
            raise ValueError("rope_ref_h/rope_ref_w must be at least one patch")

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_groups

    @property
    def pixel_head_dim(self) -> int:
        return self.pixel_attn_hidden_size // self.pixel_num_groups

    @property
    def pixels_per_patch(self) -> int:
        return self.patch_size**2

    @property
    def rope_ref_grid(self) -> tuple[int, int]:
        return self.rope_ref_h // self.patch_size, self.rope_ref_w // self.patch_size

    @property
    def num_lq_injections(self) -> int:
        return math.ceil(self.patch_depth / self.lq.interval) if self.lq else 0

    @property
    def family(self) -> Literal["pixeldit", "v1", "v1.5"]:
        if self.lq is None:
            return "pixeldit"
        return "v1.5" if self.lq.pit_inject else "v1"

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetConfig:
        """Inverse of `to_dict`; also accepts reference constructor kwargs (see `from_reference`)."""
        data = dict(data)
        if "lq" not in data and ("lq_latent_channels" in data or "sr_scale" in data or "enable_ed" in data):
            return cls.from_reference(data)
        lq = data.pop("lq", None)
        if lq is not None and not isinstance(lq, (LQConfig, Mapping)):
            raise ValueError(f"NetConfig field lq must be an object of LQConfig fields or null, got {type(lq).__name__}")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown NetConfig fields: {sorted(unknown)}")
        if lq is not None and not isinstance(lq, LQConfig):
            lq_unknown = set(lq) - {f.name for f in dataclasses.fields(LQConfig)}
            if lq_unknown:
                raise ValueError(f"unknown LQConfig fields: {sorted(lq_unknown)}")
            lq = LQConfig(**lq)
        return cls(**data, lq=lq)

    @classmethod
    def from_reference(cls, kwargs: dict[str, Any], *, pixeldit: bool | None = None) -> NetConfig:
        """Build from the keyword arguments of the reference's ``PidNet(...)`` / ``PixDiT_T2I(...)``.

        This is the ``net`` section of a golden ``config.json`` or of a reference training config,
        so self-trained models load too. ``pixeldit`` defaults to "no LQ arguments present".
        """
        kw = dict(kwargs)
        for name, required in _REFERENCE_REQUIRED.items():
            if name in kw and kw.pop(name) != required:
                raise ValueError(
                    f"reference argument {name}={kwargs[name]!r} is not supported: pid-decoder implements the "
                    f"released inference network, which has {name}={required!r}"
                )
        for name in _REFERENCE_IGNORED:
            kw.pop(name, None)
        if pixeldit is None:
            pixeldit = not any(k.startswith("lq_") or k in ("sr_scale", "pit_lq_inject") for k in kw)
        lq = None
        if not pixeldit:
            lq_map = {
                "lq_latent_channels": "latent_channels",
                "lq_hidden_dim": "hidden_dim",
                "lq_num_res_blocks": "num_res_blocks",
                "lq_latent_unpatchify_factor": "unpatchify_factor",
                "lq_conv_padding_mode": "padding_mode",
                "lq_gate_type": "gate_type",
                "lq_interval": "interval",
                "sr_scale": "sr_scale",
                "latent_spatial_down_factor": "latent_down_factor",
                "pit_lq_inject": "pit_inject",
                "lq_aux_rgb_head": "aux_rgb_head",
            }
            # parity: the reference PidNet defaults (pid_net.py) for arguments a config leaves out.
            lq_args: dict[str, Any] = {"gate_type": "sigma_aware_per_token_per_dim"}
            for ref_name, name in lq_map.items():
                if ref_name in kw:
                    lq_args[name] = kw.pop(ref_name)
            lq = LQConfig(**lq_args)
        known = {f.name for f in dataclasses.fields(cls)} - {"lq"}
        unknown = set(kw) - known
        if unknown:
            raise ValueError(f"unsupported reference network arguments: {sorted(unknown)}")
        return cls(**kw, lq=lq)


SamplerKind = Literal["student", "teacher"]


@dataclass(frozen=True)
class SamplerConfig:
    """How a checkpoint is sampled: the distilled student or the undistilled DPM-Solver++ teacher."""

    kind: SamplerKind = "student"
    steps: int = 4
    mode: str = "sde"  # student only: "sde" or "ode"
    t_list: tuple[float, ...] = (0.999, 0.866, 0.634, 0.342, 0.0)
    cfg_scale: float = 1.0  # teacher only
    base_shift: float = 6.0  # teacher only: shift = base_shift * sqrt(sqrt(H*W) / base_size)
    base_size: int = 2048

    def __post_init__(self) -> None:
        _check_types(self)
        if self.kind not in ("student", "teacher"):
            raise ValueError(f"sampler kind must be 'student' or 'teacher', got {self.kind!r}")
        if self.mode not in ("sde", "ode"):
            raise ValueError(f"sampler mode must be 'sde' or 'ode', got {self.mode!r}")
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")


def load_net_config(source: NetConfig | Mapping[str, Any] | str | os.PathLike) -> NetConfig:
    """A `NetConfig` from a NetConfig, a dict, or a JSON file (ours, the reference's network arguments, or a
    golden/reference ``config.json`` with a ``"net"`` section).

    Raises FileNotFoundError, PermissionError, TypeError (wrong kind of ``source``) or ValueError (not JSON, not
    an object, unknown or ill-typed fields), each naming the file and what is wrong.
    """
    if isinstance(source, NetConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        what = f"config file {str(path)!r}"
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{what} is a directory without config.json; pass the JSON file (--config / config=)")
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{what} does not exist; pass a JSON file of network arguments (--config FILE / config=)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except PermissionError:
            raise PermissionError(f"cannot read {what}: permission denied") from None
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not a UTF-8 text file (is it a weight file? --config takes a JSON file)") from None
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{what} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
            ) from None
    elif isinstance(source, Mapping):
        data, what = dict(source), "config"
    else:
        raise TypeError(
            f"config must be a NetConfig, a dict or the path of a JSON file, got {type(source).__name__}"
        )
    if isinstance(data, dict) and isinstance(data.get("net"), dict):  # a golden / reference config.json
        data = data["net"]
    if not isinstance(data, dict):
        raise ValueError(f"{what} must hold a JSON object of network arguments, got a {type(data).__name__}")
    try:
        return NetConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not a valid network config: {err}") from None
