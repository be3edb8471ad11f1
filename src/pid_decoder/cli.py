"""The ``pid-decoder`` command: parse arguments, call the library, write files.

Results (one path or one JSON document per output) go to stdout; messages go to stderr. Exit status: 0 on
success, 2 on usage errors, 1 on runtime errors (a one-line message; the traceback only with ``-v``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

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
            print(f"{r['alias']:<{width}}  {str(r['backbone']):<9} {scale:<4} {r['sampler']:<17} {r['name']}")
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
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--text-encoder", default=None, help="Gemma-2-2b-it: a local folder or a hub id")
    p.add_argument("--device", default="cpu", help="device for Gemma (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


@command("embed", "encode a prompt with Gemma-2 once and save it for reuse (--text-embedding)")
def cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .text import DEFAULT_TEXT_ENCODER, TextEncoder, embed_prompt_to_file

    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give exactly one of PROMPT or --prompt-file")
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8").strip()
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    encoder = TextEncoder(args.text_encoder or DEFAULT_TEXT_ENCODER, device=args.device)
    print(embed_prompt_to_file(prompt, out, encoder))
    return 0


cmd_embed.arguments = _embed_args


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
    except Exception as err:  # noqa: BLE001 - the CLI boundary: one line, traceback only with -v
        if args.verbose:
            logger.exception("failed")
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"pid-decoder {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
