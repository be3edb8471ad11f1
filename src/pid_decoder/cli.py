"""The ``pid-decoder`` command: parse arguments, call the library, write files.

Results (one path or one JSON document per output) go to stdout; messages go to stderr. Exit status: 0 on
success, 2 on usage errors, 1 on runtime errors (a one-line message; the traceback only with ``-v``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("pid_decoder.cli")

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, str]] = {}


class UsageError(Exception):
    """A problem with the command line itself (exit status 2)."""


def command(name: str, help: str):
    """Register ``func(args) -> exit status`` as subcommand ``name``; its arguments come from ``func.arguments``."""

    def wrap(func: Command) -> Command:
        _COMMANDS[name] = (func, help)
        return func

    return wrap


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")


# --------------------------------------------------------------------------- presets / info / convert / embed
def _presets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command("presets", "list the released checkpoints (aliases, backbone, scale, weight file)")
def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    rows = [
        {
            "alias": p.alias,
            "name": p.name,
            "backbone": p.backbone,
            "scale": p.scale,
            "sampler": f"{p.sampler.kind} {p.sampler.steps} steps",
            "resolutions": p.resolutions,
            "weights": p.checkpoint_path,
        }
        for p in PRESETS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(r["alias"]) for r in rows)
        for r in rows:
            scale = f"{r['scale']}x" if r["scale"] else "t2i"
            print(f"{r['alias']:<{width}}  {r['backbone']!s:<9} {scale:<4} {r['sampler']:<17} {r['name']}")
    return 0


cmd_presets.arguments = _presets_args


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pth / .safetensors checkpoint file")


@command("info", "print a checkpoint's detected variant, parameter count and dtype (JSON)")
def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import describe

    print(json.dumps(describe(args.checkpoint), indent=2))
    return 0


cmd_info.arguments = _info_args


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="official model_ema_bf16.pth, a Comfy-Org .safetensors, or our .safetensors")
    p.add_argument("output", help="output .safetensors (bf16, config in the metadata)")
    p.add_argument("--preset", help="preset alias or folder name (needed where the file's variant is ambiguous)")
    p.add_argument("--config", help="JSON file with NetConfig fields or the reference's network arguments")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="stored dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


@command("convert", "convert a checkpoint to safetensors with its config in the metadata")
def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoints import convert

    out = Path(args.output)
    if out.suffix.lower() not in (".safetensors", ".sft"):
        raise UsageError(f"output must end in .safetensors, got {out.name}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    config = read_config(args.config) if args.config else None
    print(convert(args.input, out, preset=args.preset, config=config, dtype=args.dtype))
    return 0


cmd_convert.arguments = _convert_args


def read_config(path: str) -> dict:
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"config file {path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("net"), dict):  # a golden / reference config.json
        data = data["net"]
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a JSON object of network arguments")
    return data


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (\"\" for the empty prompt)")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file instead")
    p.add_argument("-o", "--output", "--out", help="output .safetensors file (with --dataset: the output folder)")
    p.add_argument("--dataset", help="embed every caption of a training dataset (image folder or .tar shards), one "
                   "file per sample, resumable; --out defaults to DATASET/.text_embeddings")
    p.add_argument("--text-encoder", default=None, help="Gemma-2-2b-it: a local folder or a hub id")
    p.add_argument("--device", default="cpu", help="device for Gemma (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


@command("embed", "encode a prompt with Gemma-2 once and save it for reuse (--text-embedding)")
def cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .text import DEFAULT_TEXT_ENCODER, TextEncoder, embed_prompt_to_file

    if args.dataset is not None:
        return _embed_dataset(args)
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give exactly one of PROMPT or --prompt-file")
    if args.output is None:
        raise UsageError("the output file -o/--output is required")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8").strip()
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    encoder = TextEncoder(args.text_encoder or DEFAULT_TEXT_ENCODER, device=args.device)
    print(embed_prompt_to_file(prompt, out, encoder))
    return 0


cmd_embed.arguments = _embed_args


def _embed_dataset(args: argparse.Namespace) -> int:
    """`embed --dataset DIR [--out DIR]`: the training text pre-pass (pid_decoder.training.embed_dataset)."""
    from .text import DEFAULT_TEXT_ENCODER, TextEncoder
    from .training.embed_dataset import embed_dataset

    if args.prompt is not None or args.prompt_file is not None:
        raise UsageError("--dataset embeds the dataset's captions: give no PROMPT or --prompt-file")
    if not Path(args.dataset).exists() and "{" not in args.dataset:
        raise UsageError(f"dataset not found: {args.dataset}")
    encoder = TextEncoder(args.text_encoder or DEFAULT_TEXT_ENCODER, device=args.device, cache_dir=False)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(desc="embed", unit="caption", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = embed_dataset(args.dataset, args.output, encoder=encoder, progress=progress if bar else None)
    finally:
        if bar is not None:
            bar.close()
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.counters.items()) if v) or "none"
    logger.info("wrote %d embeddings (%d were already done); skipped: %s", report.written, report.existing, skipped)
    print(report.out)
    return 0


# --------------------------------------------------------------------------- decoding: shared options
DEFAULT_PRESET = "flux-2k"  # the reference's default (--backbone flux --pid_ckpt_type 2k)
DEFAULT_OUTPUT_DIR = "pid_outputs"


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"preset alias or released folder name (default {DEFAULT_PRESET}); see `presets`")
    g.add_argument("--checkpoint", help="a checkpoint file instead of the preset's weights (.pth / .safetensors)")
    g.add_argument("--config", help="JSON network arguments for --checkpoint (the reference's, or NetConfig fields)")
    g.add_argument("--backbone", help="latent space of a --checkpoint without preset (flux, sd3, sdxl, flux2, ...)")
    g.add_argument("--weights-dir", help="local mirror of the release (default $PID_WEIGHTS_DIR, else the HF cache)")
    g.add_argument("--backbone-path", help="VAE/RAE weights (file or folder) instead of the weights folder's")
    g.add_argument("--text-encoder", help="Gemma-2-2b-it: a local folder or a hub id (default the released one)")
    g.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on cuda, else fp32")


def _sampling_args(p: argparse.ArgumentParser, *, seed: int, prompt: bool = True) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--seed", type=int, default=seed,
                   help=f"all noise comes from generators seeded with this (default {seed})")
    g.add_argument("--noise-device", default="auto",
                   help="where the seeded generators live: auto (CUDA when PiD runs on CUDA, as the reference: "
                        "the reference's image for a seed), cpu (the same image for a seed on every device), cuda")
    g.add_argument("--steps", type=int, help="sampler steps (default: the preset's, 4 for the distilled ones)")
    if prompt:
        g.add_argument("--prompt", default=None, help="caption for PiD (default: the empty prompt)")
        g.add_argument("--text-embedding", help="a prompt embedding file from `pid-decoder embed` (no Gemma needed)")
    g.add_argument("--negative-embedding",
                   help="undistilled presets only: the negative prompt as an embedding file (default: Gemma encodes "
                        "the reference's negative prompt)")


def _performance_args(p: argparse.ArgumentParser) -> None:
    from .model.attention import ATTENTION_BACKENDS

    g = p.add_argument_group("speed and memory (docs/performance.md)")
    g.add_argument("--max-memory", help="memory budget of the per-pixel pathway, e.g. 6GB (default: from the free "
                                        "GPU memory); exact for any budget")
    g.add_argument("--tile", type=int, help="APPROXIMATE tiled decode, in tiles of this many pixels (multiple of 16), "
                                            "for outputs larger than it; off by default")
    g.add_argument("--tile-overlap", type=int, default=128, help="overlap of neighbouring tiles in pixels (default 128)")
    g.add_argument("--offload", action="store_true",
                   help="keep the transformer blocks in CPU memory and run them on the GPU one at a time "
                        "(GPUs smaller than the weights; slower)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks (faster on GPUs after a slow first image per size)")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                   help="CUDA attention kernels to prefer (default auto: cuDNN, then FlashAttention-2)")


def _output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", help=f"output folder (default ./{DEFAULT_OUTPUT_DIR}) or, for one input, a file")
    g.add_argument("--format", choices=["png", "jpg", "webp"], help="image format (default png, or -o's suffix)")
    g.add_argument("--compare", action="store_true", help="also write NAME_compare.EXT: native VAE decode | PiD")
    g.add_argument("--save-baseline", action="store_true", help="also write NAME_vae.EXT, the native VAE decode")
    g.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")


def _progress(args: argparse.Namespace):
    """tqdm factory writing to stderr, silent with -q."""
    from tqdm.auto import tqdm

    def make(*a, **kw):
        kw.setdefault("file", sys.stderr)
        kw.setdefault("disable", args.quiet)
        kw.setdefault("dynamic_ncols", True)
        return tqdm(*a, **kw)

    return make


class _StepBar:
    """`sample()` callback driving one short-lived tqdm bar per item."""

    def __init__(self, make, desc: str = "steps"):
        self.make, self.desc, self.bar = make, desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.make(total=total, desc=self.desc, leave=False, unit="step")
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()
            self.bar = None


def _quiet_libraries(quiet: bool) -> None:
    if not quiet:
        return
    import os

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # read when diffusers is first imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def _check_model_args(args: argparse.Namespace) -> None:
    if args.config and not args.checkpoint:
        raise UsageError("--config describes a --checkpoint file; give --checkpoint too")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint file not found: {args.checkpoint}")
    if args.backbone_path and not Path(args.backbone_path).exists():
        raise UsageError(f"--backbone-path not found: {args.backbone_path}")
    if args.negative_embedding and not Path(args.negative_embedding).is_file():
        raise UsageError(f"--negative-embedding file not found: {args.negative_embedding}")
    if getattr(args, "text_embedding", None) and not Path(args.text_embedding).is_file():
        raise UsageError(f"--text-embedding file not found: {args.text_embedding}")
    if getattr(args, "text_embedding", None) and getattr(args, "prompt", None) is not None:
        raise UsageError("give --prompt or --text-embedding, not both")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    sigma = getattr(args, "sigma", 0.0)
    if not 0.0 <= sigma <= 1.0:
        raise UsageError(f"--sigma must be in [0, 1], got {sigma}")
    if args.max_memory is not None:
        from .model.memory import parse_memory

        try:
            parse_memory(args.max_memory)
        except ValueError as err:
            raise UsageError(f"--max-memory: {err}") from None
    if args.tile is not None:
        from .tiling import plan_tiles

        try:  # the same checks the tiled decode makes, on an image of 2 x 2 tiles
            plan_tiles(2 * args.tile, 2 * args.tile, args.tile, args.tile_overlap)
        except ValueError as err:
            raise UsageError(f"--tile/--tile-overlap: {err}") from None
    import torch

    from .pipeline import resolve_noise_device

    try:  # checked before any weight is loaded
        resolve_noise_device(args.noise_device, torch.device("cpu"))
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--noise-device: {err}") from None
    if args.offload and args.compile:
        raise UsageError("--offload and --compile do not combine (the offload hooks move weights between calls)")
    from .presets import resolve_preset

    if args.preset:
        try:
            resolve_preset(args.preset)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if args.backbone:
        from .backbones import resolve_backbone_name

        try:
            resolve_backbone_name(args.backbone)
        except ValueError as err:
            raise UsageError(str(err)) from None


def _load_pipeline(args: argparse.Namespace, device: str, *, need_backbone: bool):
    """PiDPipeline from the CLI options (checks and downloads every weight file before loading any)."""
    from .accel import compile_network
    from .model.attention import set_attention_backend
    from .pipeline import PiDPipeline

    preset = args.preset or (None if args.checkpoint else DEFAULT_PRESET)
    config = read_config(args.config) if args.config else None
    if need_backbone:
        backbone = args.backbone_path or None
    else:
        backbone = False
    bar = _progress(args)(total=1, desc="loading PiD", unit="model")
    try:
        set_attention_backend(args.attention)
        pipe = PiDPipeline.from_pretrained(
            args.checkpoint or preset, preset=preset if args.checkpoint else None, config=config,
            weights_dir=args.weights_dir, device=device, dtype=args.dtype, text_encoder=args.text_encoder,
            backbone=backbone, backbone_name=args.backbone, noise_device=args.noise_device, offload=args.offload,
            max_memory=args.max_memory, tile=args.tile, tile_overlap=args.tile_overlap,
        )
        if args.compile:
            compile_network(pipe.net)
        bar.update(1)
    finally:
        bar.close()
    if args.negative_embedding:
        from .text import load_text_embedding

        pipe.negative_embedding, _ = load_text_embedding(args.negative_embedding)
    if pipe.net.config.lq is None:
        raise UsageError(
            "this checkpoint is the text-to-image PixelDiT (no latent input); upscale/decode/generate need a PiD "
            "preset such as flux-4k"
        )
    return pipe


def _text(pipe, args: argparse.Namespace):
    """The caption embedding, computed once for the whole batch (Gemma loads only if the prompt is not cached)."""
    return pipe.encode_text(args.prompt or "", args.text_embedding)


def _output_plan(args: argparse.Namespace, items, *, single_file_ok: bool) -> tuple[Path, str, Path | None]:
    """(output folder, format, explicit single output file or None)."""
    from .io import FORMATS

    out = Path(args.output) if args.output else None
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    suffix = "jpg" if suffix == "jpeg" else suffix
    if out is not None and suffix in FORMATS:
        if not single_file_ok or len(items) != 1:
            raise UsageError(f"-o {out} is a file name, but there are {len(items)} inputs; give a folder")
        fmt = args.format or suffix
        return out.parent, fmt, out
    if out is not None and out.suffix and not out.is_dir():
        raise UsageError(f"-o {out}: unknown image suffix {out.suffix!r}; use .png, .jpg or .webp, or a folder")
    return (out or Path(DEFAULT_OUTPUT_DIR)), args.format or "png", None


def _extras(path: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Paths of the optional companions of an output: compare and baseline images."""
    extra = {}
    if args.compare:
        extra["compare"] = path.with_name(f"{path.stem}_compare{path.suffix}")
    if args.save_baseline:
        extra["baseline"] = path.with_name(f"{path.stem}_vae{path.suffix}")
    return extra


def _done(path: Path, args: argparse.Namespace) -> bool:
    return not args.overwrite and path.is_file() and all(p.is_file() for p in _extras(path, args).values())


def _write(path: Path, image, baseline, args: argparse.Namespace, fmt: str) -> None:
    from .io import compare_image, save_image

    extra = _extras(path, args)
    if "baseline" in extra:
        save_image(baseline, extra["baseline"], fmt)
    if "compare" in extra:
        save_image(compare_image(baseline, image), extra["compare"], fmt)
    save_image(image, path, fmt)  # last: its presence marks the item as done
    print(path, flush=True)


class _Batch:
    """Counters, per-item error reporting and the closing summary of a batch command."""

    def __init__(self, name: str, args: argparse.Namespace, ctx):
        self.name, self.args, self.ctx = name, args, ctx
        self.written = self.skipped = self.failed = 0

    def fail(self, item: Path, err: BaseException) -> None:
        self.failed += 1
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"pid-decoder {self.name}: failed: {item}: {message}", file=sys.stderr, flush=True)
        if self.args.verbose:
            logger.exception("item %s failed", item)

    @contextlib.contextmanager
    def item(self, label):
        """Run one item: count it as written on success; report a failure and carry on with the batch."""
        try:
            yield
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as err:
            self.fail(label, err)
        else:
            self.written += 1

    def finish(self) -> int:
        from . import distributed

        written, skipped, failed = distributed.total(self.ctx, [self.written, self.skipped, self.failed])
        distributed.finish(self.ctx)
        if self.ctx.rank == 0 and (not self.args.quiet or failed):
            ranks = f" on {self.ctx.world} ranks" if self.ctx.world > 1 else ""
            print(
                f"pid-decoder {self.name}: {written} written, {skipped} skipped (already there), {failed} failed{ranks}",
                file=sys.stderr,
            )
        return 1 if failed else 0


def _start(args: argparse.Namespace):
    """Distributed context and this rank's device."""
    from . import distributed

    _quiet_libraries(args.quiet)
    ctx = distributed.init(args.device)
    return ctx, distributed.rank_device(args.device, ctx)


# --------------------------------------------------------------------------- upscale
def _upscale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMG|DIR", help="images, or folders searched recursively")
    p.add_argument("--sigma", type=float, default=0.0, help="noise the latent at this level first (0..1, default 0)")
    _model_args(p)
    _sampling_args(p, seed=5)
    _performance_args(p)
    _output_args(p)


@command("upscale", "image -> VAE latent -> PiD image at the preset's scale (4x, or 8x for siglip)")
def cmd_upscale(args: argparse.Namespace) -> int:
    from .io import IMAGE_SUFFIXES, read_image

    _check_model_args(args)
    items = _collect(args.inputs, IMAGE_SUFFIXES)
    folder, fmt, single = _output_plan(args, items, single_file_ok=True)
    ctx, device = _start(args)
    batch = _Batch("upscale", args, ctx)
    pipe = text = None
    make = _progress(args)
    mine = ctx.shard(len(items))
    for idx in make(mine, desc="images", unit="img", disable=args.quiet or len(mine) < 2):
        item = items[idx]
        target = single or folder / item.rel.with_name(f"{item.rel.name}.{fmt}")
        if _done(target, args):
            batch.skipped += 1
            continue
        if pipe is None:
            pipe = _load_pipeline(args, device, need_backbone=True)
            text = _text(pipe, args)
        with batch.item(item.path):
            image = read_image(item.path)
            need_baseline = args.compare or args.save_baseline
            result = pipe.upscale(
                image, text_embedding=text, sigma=args.sigma, seed=args.seed, steps=args.steps, index_offset=idx,
                return_baseline=need_baseline, callback=_StepBar(make),
            )
            outs, bases = result if need_baseline else (result, [None])
            _write(target, outs[0], bases[0], args, fmt)
    return batch.finish()


cmd_upscale.arguments = _upscale_args


def _collect(inputs: list[str], suffixes: tuple[str, ...]):
    from .io import collect_inputs

    try:
        items = collect_inputs(inputs, suffixes)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if not items:
        raise UsageError(f"no input files found (looked for {' '.join(suffixes)})")
    return items


# --------------------------------------------------------------------------- decode
def _decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="LATENT|DIR",
                   help="latent files (.safetensors key 'latent' or single tensor, .pt, .npy; (B,C,h,w) or (C,h,w))")
    p.add_argument("--sigma", type=float, default=0.0,
                   help="noise level of the latents in PiD's frame (0 = final/clean latent, default)")
    _model_args(p)
    _sampling_args(p, seed=0)
    _performance_args(p)
    _output_args(p)


@command("decode", "latent file(s) -> PiD images (32x the latent grid for 8x VAEs at 4x)")
def cmd_decode(args: argparse.Namespace) -> int:
    from .io import LATENT_SUFFIXES, load_latent

    _check_model_args(args)
    items = _collect(args.inputs, LATENT_SUFFIXES)
    folder, fmt, single = _output_plan(args, items, single_file_ok=True)
    need_backbone = args.compare or args.save_baseline
    ctx, device = _start(args)
    batch = _Batch("decode", args, ctx)
    pipe = text = None
    make = _progress(args)
    mine = ctx.shard(len(items))
    for idx in make(mine, desc="latents", unit="file", disable=args.quiet or len(mine) < 2):
        item = items[idx]
        base = single or folder / item.rel.with_name(f"{item.rel.name}.{fmt}")
        try:
            latents = load_latent(item.path)
        except Exception as err:
            batch.fail(item.path, err)
            continue
        n = latents.shape[0]
        targets = [base] if n == 1 else [base.with_name(f"{base.stem}_{i}{base.suffix}") for i in range(n)]
        if all(_done(t, args) for t in targets):
            batch.skipped += 1
            continue
        if pipe is None:
            pipe = _load_pipeline(args, device, need_backbone=need_backbone)
            text = _text(pipe, args)
        with batch.item(item.path):
            for i, target in enumerate(targets):
                if _done(target, args):
                    continue
                # item i of a file uses seed + i, as PiDPipeline.decode does for a batch
                result = pipe.decode(
                    latents[i : i + 1], text_embedding=text, sigma=args.sigma, seed=args.seed + i, steps=args.steps,
                    return_baseline=need_backbone, callback=_StepBar(make),
                )
                images, bases = result if need_backbone else (result, [None])
                _write(target, images[0], bases[0], args, fmt)
    return batch.finish()


cmd_decode.arguments = _decode_args


# --------------------------------------------------------------------------- generate
def _generate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", action="append", help="the prompt (repeat for several)")
    g.add_argument("--prompt-file", help="UTF-8 file with one prompt per line")
    g.add_argument("--pid-text-embedding", dest="text_embedding",
                   help="PiD's caption as an embedding file (default: Gemma encodes the prompt)")
    g = p.add_argument_group("LDM")
    g.add_argument("--ldm", help="LDM defaults to use: flux, sd3, sdxl, flux2, flux2-klein-4b, flux2-klein-9b, "
                                 "qwenimage, qwenimage-2512, zimage, zimage-turbo (default: the preset's backbone)")
    g.add_argument("--ldm-model", help="diffusers pipeline folder or hub id (default: the LDM's released model)")
    g.add_argument("--resolution", default="2048", help="FINAL output size, N or W,H (default 2048); LDM = this / scale")
    g.add_argument("--ldm-steps", type=int, help="LDM steps (default per LDM, e.g. 28 for flux)")
    g.add_argument("--guidance", type=float, help="LDM guidance scale (default per LDM, e.g. 3.5 for flux)")
    g.add_argument("--capture-steps", type=int, nargs="*",
                   help="decode x_t after these LDM steps too (default: the recommended one, e.g. 24 for flux)")
    _model_args(p)
    _sampling_args(p, seed=0, prompt=False)
    _performance_args(p)
    _output_args(p)


def _ldm_tag(args: argparse.Namespace) -> str:
    """The LDM whose defaults `generate` uses: --ldm, else the latent space of --backbone / the preset."""
    from .pipeline import LDM_DEFAULTS
    from .presets import resolve_preset

    if args.ldm:
        tag = args.ldm
    elif args.backbone:
        tag = args.backbone
    elif args.preset or not args.checkpoint:
        tag = resolve_preset(args.preset or DEFAULT_PRESET).backbone or ""
    else:
        tag = "flux"
    tag = tag.lower()
    if tag not in LDM_DEFAULTS:
        raise UsageError(f"no LDM is known for {tag!r}; pass --ldm (one of {', '.join(LDM_DEFAULTS)})")
    return tag


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in str(text).replace("x", ",").split(",")]
    except ValueError:
        raise UsageError(f"--resolution must be N or W,H, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UsageError(f"--resolution must be N or W,H with positive sizes, got {text!r}")
    return parts[0], parts[1]


def _slug(text: str, limit: int = 40) -> str:
    import re

    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return slug[:limit] or "prompt"


@command("generate", "prompt -> diffusers LDM -> captured latents -> PiD images (with the LDM's own decode)")
def cmd_generate(args: argparse.Namespace) -> int:
    from .pipeline import ldm_defaults, load_ldm_pipeline

    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            prompts += [ln.strip() for ln in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except FileNotFoundError:
            raise UsageError(f"--prompt-file not found: {args.prompt_file}") from None
    if not prompts:
        raise UsageError("give --prompt TEXT or --prompt-file FILE")
    args.prompt = None  # _check_model_args: the LDM prompt is not PiD's --prompt option
    _check_model_args(args)
    resolution = _parse_resolution(args.resolution)
    folder, fmt, _ = _output_plan(args, prompts, single_file_ok=False)
    tag = _ldm_tag(args)
    defaults = ldm_defaults(tag)
    n_steps = args.ldm_steps or defaults.steps
    capture = [k for k in defaults.capture if k <= n_steps] if args.capture_steps is None else args.capture_steps
    labels = [f"step_{k}" for k in sorted(set(capture))] + ["x0"]
    ctx, device = _start(args)
    batch = _Batch("generate", args, ctx)
    pipe = ldm = None
    make = _progress(args)
    mine = ctx.shard(len(prompts))
    for idx in make(mine, desc="prompts", unit="prompt", disable=args.quiet or len(mine) < 2):
        prompt = prompts[idx]
        sub = folder / f"{idx:04d}_{_slug(prompt)}"
        targets = [sub / f"{label}.{fmt}" for label in labels]
        if all(_done(t, args) for t in targets):
            batch.skipped += 1
            continue
        if pipe is None:
            pipe = _load_pipeline(args, device, need_backbone=False)
            ldm = load_ldm_pipeline(args.ldm_model or defaults.model, device=pipe.device, dtype=pipe.net.dtype)
            if hasattr(ldm, "set_progress_bar_config"):
                ldm.set_progress_bar_config(disable=args.quiet, leave=False, file=sys.stderr)
        with batch.item(Path(f"prompt {idx}")):
            results = pipe.generate(
                prompt, ldm_pipeline=ldm, backbone=tag, resolution=resolution, ldm_steps=args.ldm_steps,
                guidance_scale=args.guidance, capture_steps=capture, seed=args.seed, ldm_seed=args.seed + idx,
                steps=args.steps, text_embedding=args.text_embedding,
                return_baseline=args.compare or args.save_baseline, callback=_StepBar(make),
            )
            for result, target in zip(results, targets):
                _write(target, result.image, result.baseline, args, fmt)
    return batch.finish()


cmd_generate.arguments = _generate_args


# --------------------------------------------------------------------------- train / export (training/)
def _train_common_args(p: argparse.ArgumentParser) -> None:
    """CONFIG, --set and --resume: shared by `train` and `distill`."""
    p.add_argument("config", help="a TOML training config (see configs/train/ and docs/training.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=1e-4 --set run.max_steps=100 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue run.dir from its newest checkpoint (or from PATH: a checkpoint or run directory)")


def _load_train_config(args: argparse.Namespace):
    from .training.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None


@command("train", "train a PiD teacher (stage 1) or finetune PixelDiT (stage 0); one process or torchrun")
def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError
    from .training.trainer import train

    cfg = _load_train_config(args)
    if args.quiet:
        import dataclasses

        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
    elif os.environ.get("RANK", "0") == "0":  # torchrun: print once
        from .training.config import format_config

        print(format_config(cfg), file=sys.stderr)
    import torch.distributed as dist

    try:
        result = train(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, PermissionError) as err:
        raise UsageError(str(err)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.checkpoint is not None and os.environ.get("RANK", "0") == "0":
        print(result.checkpoint)
    return 0


cmd_train.arguments = _train_common_args


@command("distill", "distill a PiD teacher into the few-step student (DMD2, stage 2); one process or torchrun")
def cmd_distill(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError, format_config
    from .training.distiller import distill

    cfg = _load_train_config(args)
    if cfg.distill is None:
        raise UsageError(f"{args.config} has no [distill] section; start from configs/distill/ (docs/training.md)")
    if args.quiet:
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
    elif os.environ.get("RANK", "0") == "0":  # torchrun: print once
        print(format_config(cfg), file=sys.stderr)
    import torch.distributed as dist

    try:
        result = distill(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, PermissionError) as err:
        raise UsageError(str(err)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.checkpoint is not None and os.environ.get("RANK", "0") == "0":
        print(result.checkpoint)
    return 0


cmd_distill.arguments = _train_common_args


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds config.json and checkpoints/)")
    p.add_argument("-o", "--output", required=True, help="output file: .pth (release layout) or .safetensors")
    p.add_argument("--format", choices=["pth", "safetensors"], help="default: from the output suffix")
    p.add_argument("--which", choices=["ema", "net"], default="ema",
                   help="the EMA weights (default, what the releases ship) or the raw trained weights")
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: its newest)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="stored dtype (default bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


@command("export", "write a training run's EMA weights as a .pth (release layout) or .safetensors file")
def cmd_export(args: argparse.Namespace) -> int:
    from .training.checkpoint import CheckpointError
    from .training.export import export_format, export_run

    out = Path(args.output)
    try:
        fmt = export_format(out, args.format)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if not Path(args.run_dir).is_dir():
        raise UsageError(f"run directory not found: {args.run_dir}")
    try:
        path = export_run(args.run_dir, out, fmt, args.which, checkpoint=args.checkpoint, dtype=args.dtype)
    except (CheckpointError, PermissionError) as err:
        raise UsageError(str(err)) from None
    print(path)
    return 0


cmd_export.arguments = _export_args


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pid-decoder",
        description="PiD, the Pixel Diffusion Decoder: latents or images to 2K-4K pixels.",
    )
    parser.add_argument("--version", action="version", version=f"pid-decoder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (func, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        func.arguments(p)
        add_common(p)
        p.set_defaults(func=func)
    return parser


def _multi_line_error(err: BaseException) -> bool:
    from .text import MissingTextEncoderError
    from .weights import MissingWeightsError

    return isinstance(err, (MissingWeightsError, MissingTextEncoderError))


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        parser.exit(2, f"pid-decoder {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        print("pid-decoder: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.verbose:
            logger.exception("failed")
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _multi_line_error(err):  # these messages list what to download and where: print them whole
            message = str(err).strip()
        print(f"pid-decoder {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
