"""The ``pid-decoder`` command: parse arguments, call the library, write files.

Results (one path or one JSON document per output) go to stdout; messages go to stderr. Exit status: 0 on
success, 2 on usage errors (anything wrong on the command line, found before any work), 1 on runtime errors
(a one-line message; the traceback only with ``-v``), 130 when interrupted.

Order of work in the decoding commands: options are checked, every input file is opened and validated, the
weight files are located (one listing of everything missing), and only then are models loaded. Outputs are
written atomically, claimed before their work starts (concurrent runs on one folder split it), and a run
resumes where a killed one stopped (docs/usage.md).
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
    _check_device("--device", args.device)
    if args.prompt is not None:
        prompt = args.prompt
    else:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--prompt-file {args.prompt_file} cannot be read: {_one_line(err)}") from None
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


def _check_device(flag: str, device: str) -> None:
    from .devices import check_device

    try:
        check_device(device)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def _run_preset(args: argparse.Namespace):
    """The preset this run uses (None for a --checkpoint without --preset)."""
    from .presets import resolve_preset

    name = args.preset or (None if args.checkpoint else DEFAULT_PRESET)
    return resolve_preset(name) if name else None


def _run_net_config(args: argparse.Namespace):
    """The network config known before loading: --config, else the preset's; None when only the file knows it."""
    if args.config:
        from .config import NetConfig

        try:
            return NetConfig.from_dict(read_config(args.config))
        except (TypeError, ValueError) as err:
            raise UsageError(f"--config {args.config}: {err}") from None
    preset = _run_preset(args)
    return preset.net if preset is not None else None


def _check_tile(args: argparse.Namespace, patch: int) -> None:
    """--tile: a multiple of the patch size, and at least --tile-overlap + one patch (tiles must advance)."""
    tile, overlap = args.tile, args.tile_overlap
    if overlap < 0:
        raise UsageError(f"--tile-overlap must be >= 0 pixels, got {overlap}")
    if tile is None:
        return
    smallest = -(-(overlap + patch) // patch) * patch
    why = (f"the smallest tile is {smallest} px: tiles are whole {patch}-px patches and, overlapping by "
           f"--tile-overlap {overlap} px, must still advance by one patch")
    if tile % patch or tile < smallest:
        near = max(smallest, -(-tile // patch) * patch)
        what = f"a multiple of {patch} pixels" if tile % patch else f"at least {smallest} pixels"
        raise UsageError(f"--tile must be {what}, got {tile}; {why}. Use e.g. --tile {near}"
                         + (" or a smaller --tile-overlap" if tile >= patch and tile % patch == 0 else ""))


def _check_model_args(args: argparse.Namespace) -> None:
    """Every check of the command line that needs no input file and no weights (exit 2)."""
    from .devices import SEED_MAX

    if args.config and not args.checkpoint:
        raise UsageError("--config describes a --checkpoint file; give --checkpoint too")
    if args.checkpoint:
        ck = Path(args.checkpoint)
        if ck.is_dir():
            raise UsageError(f"--checkpoint {ck} is a folder; give the checkpoint file itself (.pth / .safetensors)")
        if not ck.is_file():
            raise UsageError(f"--checkpoint file not found: {ck}")
    if args.backbone_path and not Path(args.backbone_path).exists():
        raise UsageError(f"--backbone-path not found: {args.backbone_path}")
    if args.negative_embedding and not Path(args.negative_embedding).is_file():
        raise UsageError(f"--negative-embedding file not found: {args.negative_embedding}")
    if getattr(args, "text_embedding", None) and not Path(args.text_embedding).is_file():
        raise UsageError(f"--text-embedding file not found: {args.text_embedding}")
    if getattr(args, "text_embedding", None) and getattr(args, "prompt", None) is not None:
        raise UsageError("give --prompt or --text-embedding, not both")
    if args.text_encoder is not None and not str(args.text_encoder).strip():
        raise UsageError("--text-encoder is empty; give a Gemma-2-2b-it folder or hub id, or leave it out")
    if args.weights_dir is not None and Path(args.weights_dir).exists() and not Path(args.weights_dir).is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir} is a file; give the folder that holds the weights")
    seed = getattr(args, "seed", 0)  # serve takes the seed per job in the page
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must be in [0, 2**64 - 1] = [0, {SEED_MAX}], got {seed}")
    sigma = getattr(args, "sigma", 0.0)
    if not 0.0 <= sigma <= 1.0:
        raise UsageError(f"--sigma must be in [0, 1], got {sigma}")
    _check_device("--device", args.device)
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
            raise UsageError(f"--backbone: {err}") from None
    if args.steps is not None:
        from .sampling import STUDENT_T_LIST

        preset = _run_preset(args)
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {args.steps}")
        student = preset is None or preset.sampler.kind == "student"
        top = len(STUDENT_T_LIST) - 1
        if student and args.steps > top:
            which = f"preset {preset.alias}" if preset is not None else "checkpoint"
            raise UsageError(
                f"--steps {args.steps}: the distilled student ({which}) has a {top}-step schedule "
                f"(t = {', '.join(f'{t:g}' for t in STUDENT_T_LIST)}); use --steps 1..{top}"
            )
    if args.max_memory is not None:
        from .model.memory import parse_memory

        try:
            parse_memory(args.max_memory)
        except ValueError as err:
            raise UsageError(f"--max-memory: {err}") from None
    config = _run_net_config(args)
    _check_tile(args, config.patch_size if config is not None else 16)
    if args.tile is not None and _run_preset(args) is not None and _run_preset(args).sampler.kind == "teacher":
        raise UsageError("--tile is for the distilled presets; this preset uses the teacher sampler")
    import torch

    from .devices import resolve_noise_device

    try:  # checked before any weight is loaded
        resolve_noise_device(args.noise_device, torch.device("cpu"))
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--noise-device: {err}") from None
    if args.offload and args.compile:
        raise UsageError("--offload and --compile do not combine (the offload hooks move weights between calls)")


_CLI_WORDS = (  # API parameter words in library messages -> the CLI's flags
    ("pass config= (a NetConfig or the reference's net arguments as JSON)",
     "pass --config FILE (the reference's network arguments or NetConfig fields as JSON)"),
    ("Pass preset= (or --preset)", "Pass --preset"),
    ("pass preset=", "pass --preset"),
    ("pass backbone_name=", "pass --backbone NAME (the latent space: flux, sd3, sdxl, flux2, qwenimage, ...)"),
    ("load the pipeline with backbone= (a path, a diffusers module such as pipe.vae, or a backbone object) or "
     "from a preset with its weights", "give --preset, or --backbone NAME with --checkpoint (and --backbone-path "
     "for the VAE weights)"),
    ("return_baseline=True", "--compare/--save-baseline"),
    ("pass a smaller max_memory= budget, tile= for the approximate tiled decode, or decode a smaller output",
     "pass a smaller --max-memory budget (e.g. --max-memory 4GB), --tile N for the approximate tiled decode (N "
     "below the output size, e.g. --tile 2048 for 8K), or ask for a smaller output"),
    ("(upscale: scale=, size=, long_edge=; decode: a smaller latent)", "(upscale: --scale, --size, --long-edge)"),
    ("(max_memory= and tile= bound the network's activations, not these tensors)",
     "(--max-memory and --tile bound the network's activations, not these tensors)"),
    ("local_files_only=True", "offline (HF_HUB_OFFLINE=1 or no network)"),
)


def _cli_words(message: str) -> str:
    for api, flag in _CLI_WORDS:
        message = message.replace(api, flag)
    return message


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return _cli_words(text.splitlines()[0] if text else type(err).__name__)


def _text_needs_gemma(args: argparse.Namespace, preset) -> bool:
    """Whether this run must load Gemma: a prompt to encode that is not cached, or the teacher's negative prompt."""
    from .text import DEFAULT_TEXT_ENCODER, TextEncoder

    teacher_negative = (preset is not None and preset.sampler.kind == "teacher" and preset.sampler.cfg_scale != 1.0
                        and not args.negative_embedding)
    if getattr(args, "text_embedding", None) and not teacher_negative:
        return False
    encoder = TextEncoder(args.text_encoder or DEFAULT_TEXT_ENCODER, device="cpu")
    if not hasattr(encoder, "needs_model"):
        return True
    prompts = [] if getattr(args, "text_embedding", None) else [getattr(args, "prompt", None) or ""]
    try:
        return bool(encoder.needs_model(prompts)) or teacher_negative
    except Exception:  # a cache that cannot be read: Gemma is needed
        return True


def _needs_negative_prompt(pipe, args: argparse.Namespace) -> bool:
    return pipe.sampler.kind == "teacher" and pipe.sampler.cfg_scale != 1.0 and not args.negative_embedding


def _check_weights(args: argparse.Namespace, *, need_backbone: bool, need_gemma: bool | None = None):
    """Locate (and fetch when allowed) every weight file of the run before anything loads: `weights.RunFiles`.

    Raises `MissingWeightsError` listing everything missing at once. None where the weights module has no
    up-front check.
    """
    from . import weights

    check = getattr(weights, "check_run_files", None)
    if check is None:
        return None
    preset = _run_preset(args)
    if need_gemma is None:
        need_gemma = _text_needs_gemma(args, preset)
    return check(
        preset, weights_dir=args.weights_dir, checkpoint=args.checkpoint, backbone=args.backbone,
        need_backbone=need_backbone, backbone_path=args.backbone_path, needs_text_encoder=need_gemma,
        text_encoder=args.text_encoder,
    )


def _load_pipeline(args: argparse.Namespace, device: str, *, need_backbone: bool, files=None):
    """PiDPipeline from the CLI options (after `_check_weights`: every file is local by now)."""
    from .accel import compile_network
    from .model.attention import set_attention_backend
    from .pipeline import PiDPipeline

    preset = args.preset or (None if args.checkpoint else DEFAULT_PRESET)
    config = read_config(args.config) if args.config else None
    backbone = (args.backbone_path or None) if need_backbone else False
    offline = bool(getattr(files, "offline", False))
    bar = _progress(args)(total=1, desc="loading PiD", unit="model")
    try:
        set_attention_backend(args.attention)
        try:
            pipe = PiDPipeline.from_pretrained(
                args.checkpoint or preset, preset=preset if args.checkpoint else None, config=config,
                weights_dir=args.weights_dir, device=device, dtype=args.dtype, text_encoder=args.text_encoder,
                backbone=backbone, backbone_name=args.backbone, noise_device=args.noise_device, offload=args.offload,
                max_memory=args.max_memory, tile=args.tile, tile_overlap=args.tile_overlap,
                allow_download=False if offline else None,
            )
        except ValueError as err:
            text = str(err)
            if "backbone_name=" in text:  # the latent space of --checkpoint is unknown
                raise UsageError(
                    "the latent space of --checkpoint is unknown, so its VAE cannot be loaded; pass --backbone NAME "
                    "(flux, sd3, sdxl, flux2, qwenimage, dinov2, siglip) or --preset"
                ) from None
            raise
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
    if need_backbone and pipe.backbone is None:
        raise UsageError(
            "--compare/--save-baseline and upscale need the VAE of the latent space; give --preset, or --backbone "
            "NAME with --checkpoint (and --backbone-path for the VAE weights)"
        )
    if files is not None and files.text_encoder is None and _needs_negative_prompt(pipe, args):
        # the checkpoint turned out to be an undistilled teacher: its negative prompt needs Gemma, checked now
        _check_weights(args, need_backbone=False, need_gemma=True)
    if args.steps is not None:
        try:
            pipe.check_steps(args.steps)
        except ValueError as err:
            raise UsageError(f"--{str(err)}") from None
    return pipe


def _text(pipe, args: argparse.Namespace):
    """The caption embedding, computed once for the whole batch (Gemma loads only if the prompt is not cached)."""
    return pipe.encode_text(args.prompt or "", args.text_embedding)


def _output_plan(args: argparse.Namespace, items, *, single_file_ok: bool) -> tuple[Path, str, Path | None]:
    """(output folder, format, explicit single output file or None); the folder must be creatable/writable."""
    import os

    from .io import FORMATS

    out = Path(args.output) if args.output else None
    suffix = out.suffix.lower().lstrip(".") if out is not None else ""
    suffix = "jpg" if suffix == "jpeg" else suffix
    fmt = "jpg" if args.format == "jpeg" else args.format
    if out is not None and suffix in FORMATS:
        if not single_file_ok or len(items) != 1:
            raise UsageError(f"-o {out} is a file name, but there are {len(items)} inputs; give a folder")
        if fmt is not None and fmt != suffix:
            raise UsageError(
                f"-o {out} names a .{suffix} file but --format {fmt} was given; name the output "
                f"{out.with_suffix('.' + fmt).name} or leave out --format (the format comes from -o's suffix)"
            )
        folder, single, fmt = out.parent, out, suffix
        if out.is_dir():
            raise UsageError(f"-o {out} is an existing folder; give another file name or use it as the folder")
    elif out is not None and out.suffix and not out.is_dir():
        raise UsageError(f"-o {out}: unknown image suffix {out.suffix!r}; use .png, .jpg or .webp, or a folder")
    else:
        folder, single, fmt = (out or Path(DEFAULT_OUTPUT_DIR)), None, fmt or "png"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"-o {folder} is a file; give a folder (or a .png/.jpg/.webp name for one input)")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"-o {out or folder}: cannot write under {existing} (permission denied); choose another folder"
        )
    return folder, fmt, single


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


class OutOfSpace(Exception):
    """An output could not be written because its file system is full: the batch stops."""

    def __init__(self, path: Path, err: OSError):
        super().__init__(f"no space left writing {path} ({err.strerror or err}); free some space on that disk (or "
                         "choose another -o) and run the same command again: finished outputs are kept and skipped")
        self.path = path


_FULL_ERRNOS = {28, 122}  # ENOSPC, EDQUOT


def _write(path: Path, image, baseline, args: argparse.Namespace, fmt: str) -> None:
    from .io import compare_image, save_image

    extra = _extras(path, args)
    try:
        if "baseline" in extra:
            save_image(baseline, extra["baseline"], fmt)
        if "compare" in extra:
            save_image(compare_image(baseline, image), extra["compare"], fmt)
        save_image(image, path, fmt)  # last: its presence marks the item as done
    except OSError as err:
        if err.errno in _FULL_ERRNOS:
            raise OutOfSpace(path, err) from err
        raise
    # One write per line: torchrun ranks share stdout, and print() writes the text and its newline separately,
    # so two ranks' paths could interleave on one line.
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()


class _Batch:
    """Counters, claims, per-item error reporting and the closing summary of a batch command.

    An error on one item is reported and the batch carries on; a full disk (`OutOfSpace`) stops it at once.
    """

    def __init__(self, name: str, args: argparse.Namespace, ctx):
        self.name, self.args, self.ctx = name, args, ctx
        self.written = self.skipped = self.failed = self.elsewhere = 0
        self.stopped: OutOfSpace | None = None

    def message(self, text: str) -> None:
        print(f"pid-decoder {self.name}: {text}", file=sys.stderr, flush=True)

    def fail(self, item, err: BaseException) -> None:
        self.failed += 1
        text = _one_line(err)
        text = text[len(str(item)):].lstrip(":").lstrip() if text.startswith(str(item)) else text
        self.message(f"failed: {item}: {text}")
        if self.args.verbose:
            logger.error("item %s failed", item, exc_info=err)

    def clean(self, targets) -> None:
        """Remove what a killed run left next to these outputs: temporary files and claims of dead processes."""
        from .atomic import clean_stale_temps

        removed = []
        for folder in sorted({Path(t).parent for t in targets}):
            removed += clean_stale_temps(folder, recursive=False)
        if removed:
            logger.info("removed %d leftover file(s) of an interrupted run: %s", len(removed),
                        ", ".join(str(p) for p in removed[:5]))

    def claim(self, target: Path) -> Path | None:
        """Claim ``target`` atomically: the claim file, or None when another live run holds it."""
        from .atomic import try_claim

        try:
            claim = try_claim(target)
        except OSError as err:
            if err.errno in _FULL_ERRNOS:
                raise OutOfSpace(target, err) from err
            raise
        if claim is None:
            self.elsewhere += 1
        return claim

    @staticmethod
    def release(claim: Path | None) -> None:
        from .atomic import release_claim

        release_claim(claim)

    @contextlib.contextmanager
    def item(self, label):
        """Run one item: count it as written on success; report a failure and carry on with the batch."""
        try:
            yield
        except KeyboardInterrupt:
            raise
        except OutOfSpace as err:
            self.stopped = err
        except Exception as err:
            self.fail(label, err)
        else:
            self.written += 1

    def finish(self) -> int:
        from . import distributed

        stopped = 1 if self.stopped else 0
        written, skipped, failed, elsewhere, stopped = distributed.total(
            self.ctx, [self.written, self.skipped, self.failed, self.elsewhere, stopped]
        )
        distributed.finish(self.ctx)
        if self.stopped is not None:
            self.message(f"error: {self.stopped}")
        if self.ctx.rank == 0 and (not self.args.quiet or failed or stopped):
            ranks = f" on {self.ctx.world} ranks" if self.ctx.world > 1 else ""
            other = f", {elsewhere} left to another run working on the same outputs" if elsewhere else ""
            halt = "; stopped: disk full" if stopped else ""
            self.message(f"{written} written, {skipped} skipped (already there), {failed} failed{other}{ranks}{halt}")
        return 1 if failed or stopped else 0


def _start(args: argparse.Namespace):
    """Distributed context and this rank's device."""
    from . import distributed

    _quiet_libraries(args.quiet)
    ctx = distributed.init(args.device)
    return ctx, distributed.rank_device(args.device, ctx)


def _run_items(batch: _Batch, args, todo, work, *, need_backbone: bool, device: str, setup=_text,
               need_gemma: bool | None = None) -> int:
    """The shared loop: weights checked once, the pipeline loaded on the first item that needs work.

    ``todo``: (label, claim target, is_done(), work args); ``work(pipe, setup(pipe, args), *work args)`` computes
    and writes one item.
    """
    if not todo or batch.stopped:
        return batch.finish()
    files = _check_weights(args, need_backbone=need_backbone, need_gemma=need_gemma)
    pipe = text = None
    make = _progress(args)
    for label, target, is_done, payload in make(todo, desc="items", unit="item", disable=args.quiet or len(todo) < 2):
        if batch.stopped:
            break
        if is_done():
            batch.skipped += 1
            continue
        try:
            claim = batch.claim(target)
        except OutOfSpace as err:
            batch.stopped = err
            break
        if claim is None:  # another live run is producing it
            continue
        try:
            if is_done():  # finished by another run between the check and the claim
                batch.skipped += 1
                continue
            if pipe is None:
                pipe = _load_pipeline(args, device, need_backbone=need_backbone, files=files)
                text = setup(pipe, args)
            with batch.item(label):
                work(pipe, text, *payload)
        finally:
            batch.release(claim)
    return batch.finish()


# --------------------------------------------------------------------------- upscale
def _upscale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMG|DIR", help="images, or folders searched recursively")
    p.add_argument("--sigma", type=float, default=0.0, help="noise the latent at this level first (0..1, default 0)")
    g = p.add_argument_group("output size (default: the input x the preset's scale)").add_mutually_exclusive_group()
    g.add_argument("--scale", type=int, help="output = input x this (1 .. the preset's scale; 2 on a 4x preset runs "
                                             "the 4x decoder on a half-size input)")
    g.add_argument("--size", metavar="WxH", help="output size, e.g. 3840x2160 (the input is resized to cover it and "
                                                 "centre-cropped)")
    g.add_argument("--long-edge", type=int, metavar="N", help="output long side in pixels, aspect kept")
    _model_args(p)
    _sampling_args(p, seed=5)
    _performance_args(p)
    _output_args(p)


@command("upscale", "image -> VAE latent -> PiD image at the preset's scale (4x, or 8x for siglip)")
def cmd_upscale(args: argparse.Namespace) -> int:
    from .backbones.images import plan_upscale_size
    from .devices import check_seed
    from .io import IMAGE_SUFFIXES, check_image, read_image

    _check_model_args(args)
    size = _parse_size(args.size) if args.size else None
    config = _run_net_config(args)
    preset_scale = config.lq.sr_scale if config is not None and config.lq is not None else None
    if args.scale is not None and not 1 <= args.scale <= (preset_scale or max(args.scale, 1)):
        top = f"1..{preset_scale} for this preset (its factor is {preset_scale}x)" if preset_scale else ">= 1"
        raise UsageError(f"--scale must be {top}, got {args.scale}")
    if args.long_edge is not None and args.long_edge < 1:
        raise UsageError(f"--long-edge must be a positive number of pixels, got {args.long_edge}")
    items = _collect(args.inputs, IMAGE_SUFFIXES)
    try:
        check_seed(args.seed, len(items))
    except ValueError:
        raise UsageError(f"--seed {args.seed}: item i uses seed + i, which must stay <= 2**64 - 1 for "
                         f"{len(items)} inputs; use a smaller --seed") from None
    folder, fmt, single = _output_plan(args, items, single_file_ok=True)
    ctx, device = _start(args)
    batch = _Batch("upscale", args, ctx)
    mine = ctx.shard(len(items))
    targets = {idx: single or folder / items[idx].rel.with_name(f"{items[idx].rel.name}.{fmt}") for idx in mine}
    batch.clean(targets.values())
    sizing = args.scale is not None or size is not None or args.long_edge is not None
    todo = []
    for idx in mine:  # every input is opened and checked before any weight is touched
        item, target = items[idx], targets[idx]
        if _done(target, args):
            batch.skipped += 1
            continue
        try:
            image = read_image(item.path)
            check_image(image, item.path, min_side=1 if sizing else 16)
            if preset_scale is not None:  # the same sizing rules the pipeline applies
                plan_upscale_size(image.size, preset_scale=preset_scale, scale=args.scale, size=size,
                                  long_edge=args.long_edge)
            del image
        except Exception as err:
            batch.fail(item.path, err)
            continue
        todo.append((item.path, target, lambda t=target: _done(t, args), (idx, item, target)))
    need_baseline = args.compare or args.save_baseline
    make = _progress(args)

    def work(pipe, text, idx, item, target):
        image = read_image(item.path)
        result = pipe.upscale(
            image, text_embedding=text, sigma=args.sigma, seed=args.seed, steps=args.steps, index_offset=idx,
            return_baseline=need_baseline, callback=_StepBar(make), scale=args.scale, size=size,
            long_edge=args.long_edge,
        )
        outs, bases = result if need_baseline else (result, [None])
        _write(target, outs[0], bases[0], args, fmt)

    return _run_items(batch, args, todo, work, need_backbone=True, device=device)


cmd_upscale.arguments = _upscale_args


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).lower().replace(",", "x").split("x"))
    except ValueError:
        raise UsageError(f"--size must be WxH in pixels, e.g. 3840x2160, got {text!r}") from None
    if w < 1 or h < 1:
        raise UsageError(f"--size must be WxH with positive sizes, got {text!r}")
    return w, h


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


def _check_latent_file(latents, path: Path, args: argparse.Namespace, config) -> None:
    """The latent fits the run's network (channels) and latent space (backbones.check_latent); ValueError if not."""
    from .devices import SEED_MAX

    if config is not None and config.lq is not None and latents.shape[1] != config.lq.latent_channels:
        preset = _run_preset(args)
        which = f"preset {preset.alias}" if preset is not None else "the --config network"
        from .backbones.base import _preset_hint

        raise ValueError(
            f"{path}: {which} expects latents with {config.lq.latent_channels} channels, got {latents.shape[1]} "
            f"(shape {tuple(latents.shape)}). {_preset_hint(latents.shape[1])}".strip()
        )
    name = args.backbone or (_run_preset(args).backbone if _run_preset(args) is not None else None)
    if name is not None and config is not None and config.lq is not None:
        from .backbones import check_latent

        try:
            check_latent(name, latents, channels=config.lq.latent_channels)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    if args.seed + latents.shape[0] - 1 > SEED_MAX:
        raise ValueError(
            f"{path}: its {latents.shape[0]} latents use --seed + i, beyond 2**64 - 1; use a smaller --seed"
        )


@command("decode", "latent file(s) -> PiD images (32x the latent grid for 8x VAEs at 4x)")
def cmd_decode(args: argparse.Namespace) -> int:
    from .io import LATENT_SUFFIXES, load_latent

    _check_model_args(args)
    items = _collect(args.inputs, LATENT_SUFFIXES)
    folder, fmt, single = _output_plan(args, items, single_file_ok=True)
    need_backbone = args.compare or args.save_baseline
    config = _run_net_config(args)
    ctx, device = _start(args)
    batch = _Batch("decode", args, ctx)
    mine = ctx.shard(len(items))
    bases = {idx: single or folder / items[idx].rel.with_name(f"{items[idx].rel.name}.{fmt}") for idx in mine}
    batch.clean(bases.values())
    todo = []
    for idx in mine:  # every latent file is read and checked before any weight is touched
        item, base = items[idx], bases[idx]
        try:
            latents = load_latent(item.path)
            _check_latent_file(latents, item.path, args, config)
        except Exception as err:
            batch.fail(item.path, err)
            continue
        n = latents.shape[0]
        del latents
        targets = [base] if n == 1 else [base.with_name(f"{base.stem}_{i}{base.suffix}") for i in range(n)]
        if all(_done(t, args) for t in targets):
            batch.skipped += 1
            continue
        todo.append((item.path, base, lambda ts=targets: all(_done(t, args) for t in ts), (item, targets)))
    make = _progress(args)

    def work(pipe, text, item, targets):
        latents = load_latent(item.path)
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

    return _run_items(batch, args, todo, work, need_backbone=need_backbone, device=device)


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
    from .ldm import LDM_DEFAULTS
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
    from .io import parse_resolution

    try:
        return parse_resolution(text)
    except ValueError as err:
        raise UsageError(f"--resolution {err}") from None


def _slug(text: str, limit: int = 40) -> str:
    import re

    slug = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return slug[:limit] or "prompt"


@command("generate", "prompt -> diffusers LDM -> captured latents -> PiD images (with the LDM's own decode)")
def cmd_generate(args: argparse.Namespace) -> int:
    from .ldm import ldm_defaults, load_ldm_pipeline

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
    if args.ldm_steps is not None and args.ldm_steps < 1:
        raise UsageError(f"--ldm-steps must be >= 1, got {args.ldm_steps}")
    capture = [k for k in defaults.capture if k <= n_steps] if args.capture_steps is None else args.capture_steps
    bad = [k for k in capture if not 1 <= k <= n_steps]
    if bad:
        raise UsageError(f"--capture-steps must be in 1..{n_steps} (the LDM steps), got {bad}")
    from .devices import check_seed

    try:
        check_seed(args.seed, len(prompts))
    except ValueError:
        raise UsageError(f"--seed {args.seed}: prompt i uses seed + i for the LDM, which must stay <= 2**64 - 1; "
                         "use a smaller --seed") from None
    labels = [f"step_{k}" for k in sorted(set(capture))] + ["x0"]
    ctx, device = _start(args)
    batch = _Batch("generate", args, ctx)
    mine = ctx.shard(len(prompts))
    subs = {idx: folder / f"{idx:04d}_{_slug(prompts[idx])}" for idx in mine}
    batch.clean(sub / "x0" for sub in subs.values())
    todo = []
    for idx in mine:
        sub = subs[idx]
        targets = [sub / f"{label}.{fmt}" for label in labels]
        if all(_done(t, args) for t in targets):
            batch.skipped += 1
            continue
        todo.append((Path(f"prompt {idx}"), sub / "prompt", lambda ts=targets: all(_done(t, args) for t in ts),
                     (idx, targets)))

    def setup(pipe, args):
        ldm = load_ldm_pipeline(args.ldm_model or defaults.model, device=pipe.device, dtype=pipe.net.dtype)
        if hasattr(ldm, "set_progress_bar_config"):
            ldm.set_progress_bar_config(disable=args.quiet, leave=False, file=sys.stderr)
        return ldm

    make = _progress(args)

    def work(pipe, ldm, idx, targets):
        results = pipe.generate(
            prompts[idx], ldm_pipeline=ldm, backbone=tag, resolution=resolution, ldm_steps=args.ldm_steps,
            guidance_scale=args.guidance, capture_steps=capture, seed=args.seed, ldm_seed=args.seed + idx,
            steps=args.steps, text_embedding=args.text_embedding,
            return_baseline=args.compare or args.save_baseline, callback=_StepBar(make),
        )
        for result, target in zip(results, targets):
            _write(target, result.image, result.baseline, args, fmt)

    return _run_items(batch, args, todo, work, need_backbone=False, device=device, setup=setup,
                      need_gemma=not args.text_embedding)


cmd_generate.arguments = _generate_args


# --------------------------------------------------------------------------- serve (the web app)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
UI_INSTALL = 'the web app needs gradio: pip install "pid-decoder[ui]"'


def _serve_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    g = p.add_argument_group("text")
    g.add_argument("--text-embedding", help="prompt embedding file used when a request gives neither a prompt nor "
                                            "an embedding file (default: the empty prompt, encoded by Gemma)")
    g.add_argument("--negative-embedding",
                   help="undistilled presets only: the negative prompt as an embedding file (default: Gemma)")
    _performance_args(p)
    g = p.add_argument_group("Generate tab")
    g.add_argument("--ldm", help="LDM defaults for Generate (default: the model's latent space), as in `generate`")
    g.add_argument("--ldm-model", help="diffusers pipeline folder or hub id (default: the LDM's released model; "
                                       "the tab is offered when it is in that folder or the HF cache)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only); any other address needs --auth, "
                        "--auth-file or --no-auth")
    g.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    g.add_argument("--auth", metavar="USER:PASS", help="require this user and password (visible in the process "
                                                       "list: prefer --auth-file)")
    g.add_argument("--auth-file", metavar="FILE", help="require a login from this file: one USER:PASS per line")
    g.add_argument("--no-auth", action="store_true", help="serve a non-local --host without a login (anyone who "
                                                          "can reach the port can use the model)")
    g.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload in MB (default 50)")
    g.add_argument("--max-output-pixels", type=_pixel_count, default=4096 * 4096,
                   help="largest output, in pixels or as WxH (default 4096x4096); bigger requests are refused")
    g.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more are refused (default 16)")
    p.set_defaults(steps=None, noise_device="auto", prompt=None)


def _pixel_count(text: str) -> int:
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or WxH, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or WxH, got {text!r}")
    return parts[0] * (parts[-1] if len(parts) == 2 else 1)


def _auth_pair(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise UsageError(f"{where}: expected USER:PASS with a non-empty user and password")
    return user.strip(), password


def _serve_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The logins, after checking that a page reachable from other machines has one (or --no-auth)."""
    pairs = [_auth_pair(args.auth, "--auth")] if args.auth else []
    if args.auth_file:
        try:
            lines = Path(args.auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise UsageError(f"--auth-file {args.auth_file}: {err.strerror or err}") from None
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                pairs.append(_auth_pair(line.strip(), f"--auth-file {args.auth_file} line {n}"))
        if not pairs:
            raise UsageError(f"--auth-file {args.auth_file} holds no USER:PASS line")
    if args.no_auth and pairs:
        raise UsageError("--no-auth contradicts --auth / --auth-file; give one or the other")
    local = args.host in _LOOPBACK or args.host.startswith("127.")
    if not local and not pairs and not args.no_auth:
        raise UsageError(
            f"--host {args.host} makes the page reachable from other machines; give --auth USER:PASS or "
            "--auth-file FILE (or --no-auth to let anyone who reaches the port use it)"
        )
    return pairs


@command("serve", "a local web page: upload an image or a latent, compare before/after, download (needs [ui])")
def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    _check_model_args(args)
    auth = _serve_auth(args)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_queue < 1:
        raise UsageError("--max-upload-mb must be > 0 and --max-queue >= 1")
    if args.preset:
        from .presets import resolve_preset

        if resolve_preset(args.preset).backbone is None:
            raise UsageError(f"--preset {args.preset} is the text-to-image PixelDiT; serve a PiD preset (e.g. flux-4k)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError(UI_INSTALL) from None
    from .ui import Engine, ServeOptions, WebApp

    _quiet_libraries(args.quiet)
    options = ServeOptions(
        preset=args.preset, checkpoint=args.checkpoint, config=read_config(args.config) if args.config else None,
        backbone=args.backbone, weights_dir=args.weights_dir, backbone_path=args.backbone_path,
        text_encoder=args.text_encoder, text_embedding=args.text_embedding,
        negative_embedding=args.negative_embedding, device=args.device, dtype=args.dtype,
        max_memory=args.max_memory, tile=args.tile, tile_overlap=args.tile_overlap, offload=args.offload,
        compile=args.compile, attention=args.attention, ldm=args.ldm, ldm_model=args.ldm_model,
        max_upload_mb=args.max_upload_mb, max_output_pixels=args.max_output_pixels, fallback_preset=DEFAULT_PRESET,
    )
    engine = Engine(options)
    if not args.quiet:
        first = engine.models[engine.first].label if engine.first in engine.models else engine.first
        print(f"pid-decoder serve: loading {first}", file=sys.stderr, flush=True)
    engine.prepare()
    app = WebApp(engine, max_queue=args.max_queue)
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    try:
        try:
            url = app.start(args.host, args.port, auth=auth)
        except OSError as err:  # gradio's message speaks of its own parameters
            raise OSError(f"cannot listen on {args.host}:{args.port} (in use, or not an address of this machine); "
                          "choose another --port or --host") from err
        print(url, flush=True)  # the page is ready
        if not args.quiet:
            login = " (login required)" if auth else ""
            print(f"pid-decoder serve: serving {url}{login}; Ctrl+C stops", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        engine.close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


cmd_serve.arguments = _serve_args


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


def _run_training(args: argparse.Namespace, stage: str) -> int:
    """`train` and `distill`: load the config, print it once, run, print the last checkpoint (rank 0)."""
    import dataclasses
    import os

    import torch.distributed as dist

    from .training.checkpoint import CheckpointError
    from .training.config import ConfigError, format_config

    cfg = _load_train_config(args)
    if stage == "distill":
        from .training.distiller import distill as run

        if cfg.distill is None:
            raise UsageError(f"{args.config} has no [distill] section; start from configs/distill/ (docs/training.md)")
    else:
        from .training.trainer import train as run
    rank0 = os.environ.get("RANK", "0") == "0"  # torchrun: print once
    if args.quiet:
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
    elif rank0:
        print(format_config(cfg), file=sys.stderr)
    try:
        result = run(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, PermissionError) as err:
        raise UsageError(str(err)) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.checkpoint is not None and rank0:
        print(result.checkpoint)
    return 0


@command("train", "train a PiD teacher (stage 1) or finetune PixelDiT (stage 0); one process or torchrun")
def cmd_train(args: argparse.Namespace) -> int:
    return _run_training(args, "train")


cmd_train.arguments = _train_common_args


@command("distill", "distill a PiD teacher into the few-step student (DMD2, stage 2); one process or torchrun")
def cmd_distill(args: argparse.Namespace) -> int:
    return _run_training(args, "distill")


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
    # huggingface_hub has a handler of its own and also propagates to ours: every message would print twice
    logging.getLogger("huggingface_hub").handlers.clear()
    import warnings

    if not verbose:
        # Library UserWarnings (torch's pickle-protocol notice, ...) are attributed to our modules through their
        # stacklevel and say nothing the user can act on; our own messages go through logging. -v shows them.
        warnings.filterwarnings("ignore", category=UserWarning)


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
        message = _one_line(err)
        if _multi_line_error(err):  # these messages list what to download and where: print them whole
            message = _cli_words(str(err).strip())
        print(f"pid-decoder {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
