"""The training configuration: one tree of frozen dataclasses, read from TOML, overridable from the command line.

    cfg = load_config("configs/train/tiny-cpu.toml", overrides=["optim.lr=1e-3", "run.max_steps=20"])
    print(format_config(cfg))             # the whole tree, every value, as TOML-like text
    cfg.optim.lr, cfg.model.net           # typed values; the network is a `NetConfig`

Every key of the file and of ``--set`` must exist: an unknown key is an error that names it and lists the valid
keys of its section. Values are type-checked against the field annotations (an int is accepted for a float, a
list for a tuple). Defaults are the released stage-1 teacher recipe (training-details.md §7, T2k column) where
one exists; the example files in ``configs/train/`` spell every value out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from ..config import NetConfig


class ConfigError(ValueError):
    """A problem with a training configuration file or override (message names the key)."""


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and how long it goes."""

    dir: str = "runs/teacher"  # run directory: config.json, metrics.jsonl, checkpoints/, validation/, tensorboard/
    stage: Literal["teacher", "pixeldit"] = "teacher"  # stage 1 PiD teacher, or stage 0 PixelDiT finetune
    max_steps: int = 30_000  # optimizer steps
    seed: int = 0  # every generator is seeded from this (and the rank)
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, cuda
    precision: Literal["bf16", "fp32"] = "bf16"  # forward under bf16 autocast over float32 weights, or plain fp32
    parallel: Literal["auto", "single", "ddp", "fsdp"] = "auto"  # auto: ddp under torchrun, else single
    tf32: bool = True  # TF32 matmuls and cuDNN on CUDA (the reference's setting)
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest for tiny networks

    def __post_init__(self) -> None:
        _positive(self, "max_steps")
        if self.threads < 0:
            raise ConfigError(f"run.threads must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class ModelConfig:
    """The network: its architecture, its starting weights and what trains."""

    preset: str = ""  # a released preset (alias or folder name) for the architecture; or give `net`
    net: NetConfig | None = None  # inline network config ([model.net] and [model.net.lq] tables)
    init: str = ""  # starting weights: a .pth/.safetensors file (released layout or ours); "" = random init
    aux_rgb_head: bool = True  # v1.5 teacher: build and train the auxiliary LQ-RGB head (ignored without LQ)
    trainable: Literal["fix_backbone", "full"] = "fix_backbone"  # fix_backbone: only lq_proj + pit_lq_gate
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass

    def __post_init__(self) -> None:
        if bool(self.preset) == (self.net is not None):
            raise ConfigError("model: give exactly one of model.preset (a preset name) or a [model.net] table")


@dataclass(frozen=True)
class DataConfig:
    """Training images: a folder or WebDataset shards, bucketed by aspect ratio and resolution (docs/training.md)."""

    path: str = ""  # image folder, folder of .tar shards, or a brace pattern (shards/{000..099}.tar)
    kind: Literal["auto", "folder", "webdataset"] = "auto"
    buckets: str = "2048"  # a bucket table: 2048, 1024, multires_2048_3072|3840|4096, or square-N (one N x N bucket)
    batch_size: int = 2  # per rank and micro-step
    num_workers: int = 4  # dataloader worker processes (0: in the main process)
    text: Literal["auto", "embeddings", "encoder", "zeros"] = "auto"  # auto: embedding files if present, else Gemma
    embeddings: str = ""  # `pid-decoder embed --dataset` output folder ("" = DATASET/.text_embeddings if present)
    text_encoder: str = ""  # Gemma-2-2b-it folder or hub id for text = "encoder" ("" = the released one)
    index_cache: str = ""  # JSON file keeping the dataset index between runs ("" = RUN/data_index.json)

    def __post_init__(self) -> None:
        _positive(self, "batch_size")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ConditioningConfig:
    """How the LQ condition is built from the HQ image (stage 1): backbone, latent noising, dropout."""

    backbone: str = "flux"  # latent space (flux, flux2, qwenimage, sd3, sdxl, dinov2, siglip) or "pixels" (tiny tests)
    backbone_path: str = ""  # backbone weights (see docs/backbones.md); "" = the documented default
    noise_prob: float = 0.75  # latent noising probability per sample
    sigma_max: float = 0.8  # sigma ~ U[0, sigma_max)
    caption_dropout: float = 0.1
    lq_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("noise_prob", "sigma_max", "caption_dropout", "lq_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"conditioning.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, the warm-up schedule, clipping and accumulation (training-details.md §5)."""

    lr: float = 5e-5
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    fused: bool = True  # fused AdamW kernel where the device has one
    warmup_steps: int = 2000
    warmup_start: float = 1e-6  # LR factor at step 0, rising linearly to 1.0 at warmup_steps
    grad_clip: float = 0.1  # max global L2 norm; non-finite norms skip the step
    grad_accum: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps", "grad_clip", "grad_accum")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.weight_decay and optim.warmup_steps must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two values in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class EMAConfig:
    """The reference's power EMA: beta(it) = (1 - 1/(it+1))^(gamma+1), gamma from the rate."""

    rate: float = 0.1

    def __post_init__(self) -> None:
        _positive(self, "rate")


@dataclass(frozen=True)
class LossConfig:
    """Flow-matching time sampling and loss weights (training-details.md §3)."""

    shift: Literal["dynamic", "static"] = "dynamic"
    static_shift: float = 6.0  # shift = static_shift (static), or base_shift * sqrt(sqrt(H*W) / base_size)
    base_shift: float = 6.0
    base_size: int = 2048
    diffusion_weight: float = 1.0
    lq_align_weight: float = 0.8  # v1.5 aux LQ-RGB alignment loss (only with the aux head)
    lq_align_y_weight: float = 0.25  # YCbCr weights of the Charbonnier difference
    lq_align_chroma_weight: float = 1.0
    lq_align_eps: float = 1e-3
    lq_align_sigma_power: float = 1.0  # per-sample weight (1 - sigma)^p

    def __post_init__(self) -> None:
        _positive(self, "static_shift", "base_shift", "base_size", "lq_align_eps")
        for name in ("diffusion_weight", "lq_align_weight", "lq_align_y_weight", "lq_align_chroma_weight",
                     "lq_align_sigma_power"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 5000  # optimizer steps between saves (also saved at the end and on SIGTERM/SIGINT)
    keep_last: int = 3

    def __post_init__(self) -> None:
        _positive(self, "every", "keep_last")


@dataclass(frozen=True)
class LogConfig:
    every: int = 50  # steps between metric lines (the only host syncs of the loop)
    tensorboard: bool = True  # write TensorBoard events when the package is installed
    progress: bool = True  # rank-0 progress bar on stderr

    def __post_init__(self) -> None:
        _positive(self, "every")


@dataclass(frozen=True)
class ValidationConfig:
    """A grid of fixed validation samples decoded by the current EMA with the teacher sampler."""

    every: int = 2500  # steps between grids (0: never)
    images: int = 2  # the first N images of the dataset, in order
    steps: int = 25
    cfg_scale: float = 1.0  # CFG against the negative prompt (Gemma) or the empty caption (pre-pass files); 1: off
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "images", "steps")
        if self.every < 0:
            raise ConfigError(f"validation.every must be >= 0, got {self.every}")


@dataclass(frozen=True)
class DistillConfig:
    """Stage 2, DMD2 distillation (distillation.md §7); present only in `pid-decoder distill` configs."""

    teacher: str = ""  # undistilled teacher: .pth/.safetensors file or a teacher run dir (its EMA)
    student_init: str = ""  # "" = same as teacher
    student_update_freq: int = 6
    t_list: tuple[float, ...] = (0.999, 0.866, 0.634, 0.342, 0.0)
    sample_steps: int = 4
    vsd_weight: float = 1.0
    dsm_weight: float = 1.0
    teacher_cfg_scale: float = 3.0
    t_clamp: tuple[float, float] = (0.02, 0.99)
    fake_score_lr: float = 1e-5
    fake_score_weight_decay: float = 1e-3
    fake_score_betas: tuple[float, float] = (0.9, 0.999)
    discriminator_lr: float = 1e-5
    discriminator_weight_decay: float = 0.0
    gan_weight: float = 0.05
    gan_warmup: int = 100
    feature_indices: tuple[int, ...] = (7,)
    disc_conv_layers: int = 2
    r1_weight: float = 200.0
    r1_alpha: float = 0.1
    negative_embedding: str = ""  # safetensors file with the negative-prompt embedding (1, T, D); "" = encode it

    def __post_init__(self) -> None:
        _positive(self, "student_update_freq", "sample_steps", "fake_score_lr", "discriminator_lr")


@dataclass(frozen=True)
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="flux-4k-undistilled"))
    data: DataConfig = field(default_factory=DataConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distill: DistillConfig | None = None  # stage 2 only

    # ------------------------------------------------------------------ derived
    @property
    def net_config(self) -> NetConfig:
        """The network architecture (the preset's, with the aux head as configured, or the inline one)."""
        from ..presets import resolve_preset

        net = self.model.net if self.model.net is not None else resolve_preset(self.model.preset).net
        if net.lq is not None and net.lq.aux_rgb_head != self.model.aux_rgb_head:
            net = dataclasses.replace(net, lq=dataclasses.replace(net.lq, aux_rgb_head=self.model.aux_rgb_head))
        return net

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Keys that may change between a run and its resume: they do not change what is computed.
RESUME_SAFE_KEYS = frozenset(
    {
        "run.max_steps", "run.dir", "run.device", "run.threads", "data.num_workers", "data.path", "data.index_cache",
        "data.embeddings", "data.text_encoder", "conditioning.backbone_path", "model.init", "model.activation_checkpointing",
        "checkpoint.every", "checkpoint.keep_last", "log.every", "log.tensorboard", "log.progress",
        "validation.every", "validation.images", "validation.steps", "validation.cfg_scale", "validation.seed",
    }
)


# --------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a TOML file (or the defaults with ``path=None``) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    return config_from_dict(data)


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ("optim.lr", 1e-4). Values are TOML literals; anything else is a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
    key, text = (s.strip() for s in item.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as fsdp or a path
    return key, value


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[last] = value


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a `TrainConfig` from nested plain values (a parsed TOML file or a saved ``config.json``)."""
    return _build(TrainConfig, data, "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}"
            + (f" (and {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; valid keys of {where}: {', '.join(names)}"
        )
    kwargs = {name: _convert(hints[name], data[name], f"{prefix}{name}") for name in names if name in data}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, key)
    if hint is NetConfig:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of NetConfig fields, got {value!r}")
        try:
            return NetConfig.from_dict(value)
        except (ValueError, TypeError) as err:
            valid = [f.name for f in dataclasses.fields(NetConfig)]
            raise ConfigError(f"{key}: {err}; valid keys: {', '.join(valid)}") from None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        items = args if args and args[-1] is not Ellipsis else (args[0],) * len(value)
        if len(items) != len(value):
            raise ConfigError(f"{key} must hold {len(items)} values, got {len(value)}: {list(value)}")
        return tuple(_convert(h, v, f"{key}[{i}]") for i, (h, v) in enumerate(zip(items, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")  # pragma: no cover - a bug in this file


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.removesuffix("Config").lower()
    for name in names:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {getattr(obj, name)}")


# --------------------------------------------------------------------------- writing and comparing
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (the network table stays one value per field)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any], ignore=RESUME_SAFE_KEYS) -> list[str]:
    """Keys whose values differ between two config dicts (``"optim.lr: 5e-05 -> 0.0001"``), safe keys ignored."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def format_config(cfg: TrainConfig) -> str:
    """The whole tree as TOML-like text, one ``[section]`` per table (printed at the start of a run)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], name: str) -> None:
        values = {k: v for k, v in table.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if name and (values or not tables):
            lines.append(f"[{name}]")
        for k, v in values.items():
            lines.append(f"# {k} (not set)" if v is None else f"{k} = {_toml_value(v)}")
        if name and (values or not tables):
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{name}.{k}" if name else k)

    emit(cfg.to_dict(), "")
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)
