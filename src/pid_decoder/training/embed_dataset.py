"""Text-embedding pre-pass: one Gemma embedding file per training caption, so training needs no Gemma.

    pid-decoder embed --dataset photos/ [--out photos/.text_embeddings] [--text-encoder ./gemma-2-2b-it]

Output folder layout (read by `data.build_loader(..., embeddings=...)`):

    samples/<key>.safetensors            the caption of sample <key> (a plain-string caption)
    samples/<key>.<variant>.safetensors  one per caption variant (prompt / prompt_medium / prompt_short)
    empty.safetensors                    the empty caption "" (what caption dropout trains with)
    manifest.json                        encoder identity, counts, "complete": true once the pass finished

Each file is `pid_decoder.text.save_text_embedding`'s format (the prompt is in its metadata, so a caption that
changed is detected), written atomically. A rerun skips every file whose recorded prompt still matches, so an
interrupted pass resumes where it stopped. A sample whose caption cannot be read is counted, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import (
    EMBEDDINGS_DIRNAME,
    CaptionError,
    _open_source,
    _write_json_atomic,
    caption_candidates,
    embedding_path,
)

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "pid-decoder/dataset-text-embeddings"


@dataclass
class EmbedReport:
    out: Path
    written: int = 0  # files encoded and written by this run
    existing: int = 0  # files already there with the right prompt
    counters: Counter = field(default_factory=Counter)  # samples skipped, by reason


def _recorded_prompt(path: Path) -> str | None:
    """The prompt in an embedding file's metadata (header only), or None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("prompt")
    except Exception:  # noqa: BLE001 - a partial or foreign file is simply redone
        return None


def embed_dataset(
    dataset: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    encoder: Any,
    kind: str = "auto",
    batch_size: int = 16,
    index_cache: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """Write the embedding of every caption (each variant) of ``dataset`` under ``out``.

    Args:
        dataset: what `data.build_loader` takes (image folder, shard folder, brace pattern or shard list).
        out: output folder; default ``DATASET/.text_embeddings`` for a folder dataset.
        encoder: a `pid_decoder.text.TextEncoder` (its disk cache is bypassed: these files are the cache).
        batch_size: prompts per Gemma call.
        progress: called with (samples done, samples total) after each batch.

    Raises ValueError when ``out`` holds embeddings of another encoder.
    """
    from ..text import save_text_embedding

    if out is None:
        if not isinstance(dataset, (str, os.PathLike)) or not Path(dataset).is_dir():
            raise ValueError("pass out= (the embedding folder) for a dataset that is not a folder")
        out = Path(dataset) / EMBEDDINGS_DIRNAME
    out = Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    source = _open_source(dataset, kind, index_cache)
    report = EmbedReport(out, counters=Counter(source.counters))
    manifest_path = out / "manifest.json"
    identity = encoder.identity
    if manifest_path.is_file():
        previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("encoder")
        if previous not in (None, identity):
            raise ValueError(
                f"{str(out)!r} holds embeddings of another text encoder ({previous}); this one is {identity}. "
                "Use another --out folder or delete that one."
            )
    manifest = {"format": MANIFEST_FORMAT, "encoder": identity, "complete": False, "samples": len(source)}
    _write_json_atomic(manifest_path, manifest)

    todo: list[tuple[Path, str]] = [(out / "empty.safetensors", "")]
    for i in range(len(source)):
        try:
            candidates = caption_candidates(source.caption_value(i))
        except (CaptionError, OSError, UnicodeDecodeError, ValueError) as exc:
            report.counters["bad_caption"] += 1
            logger.warning("skipping the caption of %s: %s", source.keys[i], exc)
            continue
        for caption, variant in candidates:
            todo.append((embedding_path(out, source.keys[i], variant), caption))
    pending = []
    for path, prompt in todo:
        if path.is_file() and _recorded_prompt(path) == prompt:
            report.existing += 1
        else:
            pending.append((path, prompt))
    logger.info("embedding %d captions (%d already done) into %s", len(pending), report.existing, out)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        prompts = list(dict.fromkeys(p for _, p in chunk))
        # The raw encoder output (bf16 for the reference's Gemma) without the prompt cache: these files are it.
        embs = dict(zip(prompts, encoder._encode_raw(prompts)))  # prompt -> (T, D)
        for path, prompt in chunk:
            emb = embs[prompt]
            if emb.dtype not in (torch.float32, torch.bfloat16):
                emb = emb.float()
            save_text_embedding(path, emb, prompt=prompt, encoder=identity)
            report.written += 1
        if progress is not None:
            progress(min(start + batch_size, len(pending)), len(pending))
    manifest.update(complete=True, files=len(todo), skipped=dict(report.counters))
    _write_json_atomic(manifest_path, manifest)
    return report
