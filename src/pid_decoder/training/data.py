"""Training images: image folders and WebDataset shards, aspect-ratio buckets, a resumable rank-sharded sampler.

Legend: B batch per rank, G = B x world (global batch), H/W bucket size.

    loader = build_loader("photos/", buckets="2048", batch_size=2, rank=rank, world_size=world, seed=0)
    for batch in loader:            # endless: epoch after epoch
        batch["hq"]                 # (B, 3, H, W) float32 in [-1, 1], one bucket per batch
        batch["caption"], batch["key"]   # list[str] each
        batch.get("text")           # (B, T, D) float32 when `pid-decoder embed --dataset` files exist
    checkpoint["data"] = loader.state_dict()        # the position of the next batch; load_state_dict resumes

Pipeline (spec training-details.md §1). An *index* pass reads every image's header once (size only; optional
JSON cache), assigns each image its bucket (`buckets.plan_resize`) and drops, with a count, the images that
are too small, unreadable or have no caption. Loading a sample decodes it (PIL, RGB), resizes it with LANCZOS
and centre-crops it to its bucket, and maps it to [-1, 1] as ``(x / 255 - 0.5) / 0.5``.

Order (`BucketBatchSampler`): for epoch e a permutation seeded by (seed, e) is grouped by bucket and cut into
global batches of G samples, which are shuffled; rank r takes the r-th of the ``world`` slices of every global
batch. So every rank sees the same bucket at each step, ranks are disjoint, their union at a step is the one
process batch of size G, and the order depends only on (seed, epoch, dataset) -- not on workers or timing.

Failures while loading (a truncated file, a stale embedding) never stop training: the sample is replaced by the
next sample of the same bucket (so batch shapes and ranks stay in step) and counted in `BucketLoader.counters`.

WebDataset shards are indexed once (member offsets) and then read by random access, so the position is exact
at every batch, like the folder source. Shards must be plain (uncompressed) local tar files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import tarfile
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .buckets import Bucket, BucketTable, apply_plan, get_bucket_table, plan_resize

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("json", "txt")  # in a shard sample, json wins over txt
CAPTION_KEYS = ("caption", "captions_qwen2p5_7b_v4")  # spec §1.4: exactly one must be present
PROMPT_FIELDS = ("prompt", "prompt_medium", "prompt_short")  # chosen with equal weights
MAX_IMAGE_PIXELS = 933_120_000  # the reference's PIL setting (webdataset/decoders/image.py)
EMBEDDINGS_DIRNAME = ".text_embeddings"  # default pre-pass output inside a dataset folder
INDEX_VERSION = 1


class CaptionError(ValueError):
    """A sample's caption cannot be resolved (the reference drops such samples)."""


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def caption_candidates(value: Any) -> list[tuple[str, str | None]]:
    """Every caption a sample may train with, as ``(text, variant)`` (variant None for a plain string).

    ``value`` is a plain string (a ``.txt`` file, a metadata.jsonl ``text``) or a parsed JSON object (a
    shard's ``.json``): exactly one of ``caption`` / ``captions_qwen2p5_7b_v4`` (spec §1.4), wrappers
    ``{"caption": ...}`` / ``{"captions": ...}`` unwrapped repeatedly, then a string, or a dict whose non-empty
    ``prompt`` / ``prompt_medium`` / ``prompt_short`` are the variants. Raises CaptionError otherwise.
    """
    if isinstance(value, dict):
        present = [k for k in CAPTION_KEYS if k in value]
        if len(present) > 1:
            raise CaptionError(f"caption JSON has both {present}; exactly one must be present")
        if present:
            value = value[present[0]]
        while isinstance(value, dict) and ("caption" in value or "captions" in value):
            value = value["caption"] if "caption" in value else value["captions"]
    if isinstance(value, str):
        return [(value, None)]
    if isinstance(value, dict):
        found = [(value[f], f) for f in PROMPT_FIELDS if isinstance(value.get(f), str) and value[f]]
        if found:
            return found
        raise CaptionError(f"caption dict has none of the non-empty fields {PROMPT_FIELDS}")
    raise CaptionError(f"no caption: expected a string or one of the keys {CAPTION_KEYS}, got {type(value).__name__}")


def choose_caption(candidates: list[tuple[str, str | None]], rng: np.random.Generator) -> tuple[str, str | None]:
    """One candidate with equal weights (the reference's 1:1:1 choice, Q13), from a per-sample generator."""
    return candidates[0] if len(candidates) == 1 else candidates[int(rng.integers(len(candidates)))]


def embedding_path(root: Path, key: str, variant: str | None) -> Path:
    """Where the pre-pass stores the embedding of sample ``key`` (and caption variant)."""
    name = f"{key}.{variant}.safetensors" if variant else f"{key}.safetensors"
    return root / "samples" / name


# --------------------------------------------------------------------------------------------------
# Sources: index once (key, native size, where the bytes and the caption are), read by position
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_image(fileobj):
    """PIL open with the reference's MAX_IMAGE_PIXELS instead of PIL's default (restored afterwards); PIL
    refuses images over twice that as decompression bombs."""
    from PIL import Image

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fileobj) as im:
                yield im
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _image_size(fileobj) -> tuple[int, int]:
    """(W, H) from the image header only; raises on anything PIL cannot identify."""
    with _open_image(fileobj) as im:
        return im.size


def _decode_image(fileobj):
    """Fully decode to 8-bit RGB (alpha over white, 16-bit scaled: `backbones.images`)."""
    from ..backbones.images import _to_rgb8

    with _open_image(fileobj) as im:
        im.load()
        return _to_rgb8(im)


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path | None, kind: str) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable index cache %s: %s", path, exc)
        return {}
    if data.get("version") != INDEX_VERSION or data.get("kind") != kind:
        return {}
    return data.get("entries", {})


class ImageFolderSource:
    """Images under ``root`` (recursive; jpg/jpeg/png/webp, any case; folders starting with "." skipped).

    Caption: a same-stem ``.txt`` next to the image, else the ``text`` (or ``caption``) field of the entry whose
    ``file_name`` (relative to that metadata file's folder) names the image in any ``metadata.jsonl``. The key is
    the image path relative to ``root`` without its extension.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike, *, index_cache: str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {str(self.root)!r} does not exist")
        self.counters: Counter[str] = Counter()
        files, metadata = self._scan()
        cache_path = Path(index_cache) if index_cache is not None else None
        cache = _read_cache(cache_path, self.kind)
        new_cache: dict[str, list] = {}
        self.keys: list[str] = []
        self.paths: list[Path] = []
        self.sizes: list[tuple[int, int]] = []
        self.captions: list[Any] = []  # a Path to a .txt, or the metadata value itself
        seen: set[str] = set()
        for path, caption in self._with_captions(files, metadata):
            rel = path.relative_to(self.root).as_posix()
            key = rel.rsplit(".", 1)[0]
            if key in seen:
                self.counters["duplicate_key"] += 1
                logger.warning("skipping %s: another image has the key %r", path, key)
                continue
            seen.add(key)
            if caption is None:
                self.counters["no_caption"] += 1
                continue
            size = self._size(path, rel, cache, new_cache)
            if size is None:
                continue
            self.keys.append(key)
            self.paths.append(path)
            self.sizes.append(size)
            self.captions.append(caption)
        if cache_path is not None:
            _write_json_atomic(cache_path, {"version": INDEX_VERSION, "kind": self.kind, "entries": new_cache})

    def _scan(self) -> tuple[list[Path], dict[Path, Any]]:
        files: list[Path] = []
        metadata: dict[Path, Any] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            folder = Path(dirpath)
            for name in sorted(filenames):
                if name == "metadata.jsonl":
                    metadata.update(self._read_metadata(folder / name))
                elif "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS and not name.startswith("."):
                    files.append(folder / name)
        return files, metadata

    def _read_metadata(self, path: Path) -> dict[Path, Any]:
        out: dict[Path, Any] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name = row["file_name"]
                    value = row["text"] if "text" in row else row["caption"]
                except (ValueError, KeyError, TypeError):
                    self.counters["bad_metadata_line"] += 1
                    logger.warning("%s:%d: expected a JSON object with file_name and text", path, lineno)
                    continue
                out[(path.parent / name).resolve()] = value
        return out

    def _with_captions(self, files: list[Path], metadata: dict[Path, Any]) -> Iterator[tuple[Path, Any]]:
        for path in files:
            txt = path.with_suffix(".txt")
            if txt.is_file():
                yield path, txt
            else:
                yield path, metadata.get(path.resolve())

    def _size(self, path: Path, rel: str, cache: dict, new_cache: dict) -> tuple[int, int] | None:
        try:
            st = path.stat()
            hit = cache.get(rel)
            if hit is not None and hit[:2] == [st.st_size, st.st_mtime_ns]:
                entry = hit
            else:
                try:
                    entry = [st.st_size, st.st_mtime_ns, *_image_size(path), None]
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for unreadable files
                    entry = [st.st_size, st.st_mtime_ns, 0, 0, f"{type(exc).__name__}: {exc}"]
            new_cache[rel] = entry
        except OSError as exc:
            entry = [0, 0, 0, 0, str(exc)]
        if entry[4] is not None:
            self.counters["corrupt"] += 1
            logger.warning("skipping unreadable image %s: %s", path, entry[4])
            return None
        return int(entry[2]), int(entry[3])

    def __len__(self) -> int:
        return len(self.keys)

    def caption_value(self, i: int) -> Any:
        caption = self.captions[i]
        if isinstance(caption, Path):
            return caption.read_text(encoding="utf-8").strip()
        return caption

    def open_image(self, i: int):
        return _decode_image(self.paths[i])


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """A folder (every ``*.tar`` below it, sorted), a brace pattern ``data/{000..009}.tar``, or a list of files."""
    if isinstance(shards, (str, os.PathLike)):
        text = os.fspath(shards)
        if "{" in text:
            from braceexpand import braceexpand

            paths = [Path(p) for p in braceexpand(text)]
        elif Path(text).is_dir():
            paths = sorted(p for p in Path(text).rglob("*.tar") if not any(s.startswith(".") for s in p.parts[-2:]))
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"WebDataset shard(s) not found: {', '.join(missing[:5])}")
    return paths


class WebDatasetSource:
    """Samples of WebDataset tar shards: members grouped by key (webdataset's own ``base_plus_ext`` rule),
    an image (jpg/jpeg/png/webp) plus a caption (json, else txt).

    Two layouts: image and caption in the same tar, or the reference's one folder per modality
    (``<root>/image/<rel>.tar`` with a same-named ``<root>/caption/<rel>.tar``), which are paired automatically.
    The sample key is ``<shard path relative to the shards' common folder, without .tar>/<sample key>``.

    Each shard is indexed once (member offsets and image sizes; cached in ``index_cache`` when given) and then
    read by random access, which keeps the sampler's order and position exact.
    """

    kind = "webdataset"

    def __init__(
        self, shards: str | os.PathLike | Sequence[str | os.PathLike], *, index_cache: str | os.PathLike | None = None
    ):
        pairs = _pair_modalities(resolve_shards(shards))
        if not pairs:
            raise ValueError(f"no WebDataset shards (*.tar) in {shards!r}")
        self.files: list[Path] = []  # every tar read: image shards and their caption companions
        common = Path(os.path.commonpath([p.parent.resolve() for p, _ in pairs]))
        self.counters: Counter[str] = Counter()
        cache_path = Path(index_cache) if index_cache is not None else None
        cache = _read_cache(cache_path, self.kind)
        new_cache: dict[str, dict] = {}
        self.keys: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.members: list[tuple[int, int, int, int, int, int, str]] = []  # file/off/len of image, then caption
        for path, companion in pairs:
            prefix = path.resolve().with_suffix("").relative_to(common).as_posix()
            ids = [len(self.files), len(self.files) + 1]
            self.files += [path] if companion is None else [path, companion]
            stat = [[f.stat().st_size, f.stat().st_mtime_ns] for f in (path, companion) if f is not None]
            entry = cache.get(str(path.resolve()))
            if entry is None or entry.get("stat") != stat:
                entry = {"stat": stat, "samples": self._index_shard(path, companion)}
            new_cache[str(path.resolve())] = entry
            for key, img_f, img_off, img_len, cap_f, cap_off, cap_len, cap_ext, w, h, reason in entry["samples"]:
                if reason is not None:
                    self.counters[reason.split(":", 1)[0]] += 1
                    continue
                self.keys.append(f"{prefix}/{key}")
                self.sizes.append((w, h))
                self.members.append((ids[img_f], img_off, img_len, ids[cap_f], cap_off, cap_len, cap_ext))
        if cache_path is not None:
            _write_json_atomic(cache_path, {"version": INDEX_VERSION, "kind": self.kind, "entries": new_cache})
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    @staticmethod
    def _index_shard(path: Path, companion: Path | None) -> list[list]:
        """[key, image file (0 shard, 1 companion), offset, length, caption file, offset, length, caption ext,
        W, H, skip reason or None] per sample."""
        from webdataset.tariterators import base_plus_ext

        groups: dict[str, dict[str, tuple[int, tarfile.TarInfo]]] = {}
        out: list[list] = []
        tars: list[tarfile.TarFile] = []
        with contextlib.ExitStack() as stack:
            for which, tar_path in enumerate(p for p in (path, companion) if p is not None):
                try:
                    tars.append(stack.enter_context(tarfile.open(tar_path, "r:")))
                except tarfile.ReadError as exc:
                    raise ValueError(
                        f"{str(tar_path)!r} is not a readable uncompressed tar ({exc}); WebDataset shards must be "
                        "plain .tar files"
                    ) from exc
                for member in tars[-1]:
                    if not member.isfile():
                        continue
                    key, ext = base_plus_ext(member.name)
                    if key is None or os.path.basename(key).startswith("__"):
                        continue
                    if key.startswith("/") or ".." in key.split("/"):  # keys name files (embeddings): stay inside
                        logger.warning("skipping tar member %r of %s: unsafe name", member.name, tar_path)
                        continue
                    groups.setdefault(key, {})[ext.lower()] = (which, member)
            for key, parts in groups.items():
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                cap_ext = next((e for e in CAPTION_EXTS if e in parts), None)
                if image is None:
                    continue  # a caption or metadata member without an image
                if cap_ext is None:
                    out.append([key, 0, 0, 0, 0, 0, 0, "", 0, 0, "no_caption"])
                    continue
                (img_f, img), (cap_f, cap) = image, parts[cap_ext]
                try:
                    w, h = _image_size(tars[img_f].extractfile(img))
                    reason = None
                except Exception as exc:  # noqa: BLE001 - PIL raises many types for unreadable files
                    w = h = 0
                    reason = f"corrupt: {type(exc).__name__}: {exc}"
                    logger.warning("skipping unreadable image %s in %s: %s", img.name, path, exc)
                out.append([key, img_f, img.offset_data, img.size, cap_f, cap.offset_data, cap.size, cap_ext, w, h,
                            reason])
        return out

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, file: int, offset: int, length: int) -> bytes:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share file offsets with its parent
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(file)
        if f is None:
            f = self._handles[file] = open(self.files[file], "rb")  # noqa: SIM115 - kept open per worker
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise OSError(f"{self.files[file]} is shorter than its index says (re-index it)")
        return data

    def caption_value(self, i: int) -> Any:
        _, _, _, cap_f, cap_off, cap_len, cap_ext = self.members[i]
        text = self._read(cap_f, cap_off, cap_len).decode("utf-8")
        return json.loads(text) if cap_ext == "json" else text.strip()

    def open_image(self, i: int):
        img_f, img_off, img_len, *_ = self.members[i]
        return _decode_image(io.BytesIO(self._read(img_f, img_off, img_len)))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files never travel to worker processes
        return state


def _pair_modalities(paths: list[Path]) -> list[tuple[Path, Path | None]]:
    """Pair ``.../image/<rel>.tar`` with ``.../caption/<rel>.tar`` (the reference's layout); others stand alone."""
    pairs: list[tuple[Path, Path | None]] = []
    companions: set[Path] = set()
    for path in paths:
        parts = path.parts
        if "image" in parts:
            i = len(parts) - 1 - parts[::-1].index("image")
            companion = Path(*parts[:i], "caption", *parts[i + 1 :])
            if companion.is_file():
                pairs.append((path, companion))
                companions.add(companion.resolve())
                continue
        pairs.append((path, None))
    return [(p, c) for p, c in pairs if p.resolve() not in companions]


class BucketDataset(torch.utils.data.Dataset):
    """The samples of a source that fit a bucket table, loaded as bucket-sized tensors.

    Items are addressed as ``(position, epoch)`` (what `BucketBatchSampler` yields): the epoch seeds the
    per-sample caption-variant choice, so a sample's content depends only on (seed, epoch, position).
    """

    def __init__(self, source, table: BucketTable, *, embeddings: Path | None = None, seed: int = 0):
        self.source = source
        self.table = table
        self.embeddings = embeddings
        self.seed = int(seed)
        self.counters: Counter[str] = Counter(source.counters)
        self.counters["indexed"] = len(source) + sum(v for k, v in source.counters.items() if k != "bad_metadata_line")
        plans: dict[tuple[int, int], Bucket | None] = {}
        bucket_index = {b.key: i for i, b in enumerate(table.buckets)}
        kept, bucket_ids = [], []
        for i, size in enumerate(source.sizes):
            if size not in plans:
                plan = plan_resize(*size, table)
                plans[size] = None if plan is None else plan.bucket
            bucket = plans[size]
            if bucket is None:
                self.counters["too_small"] += 1
                continue
            kept.append(i)
            bucket_ids.append(bucket_index[bucket.key])
        self.source_ids = np.asarray(kept, dtype=np.int64)
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.buckets: tuple[Bucket, ...] = table.buckets
        order = np.argsort(self.bucket_ids, kind="stable")
        starts = np.searchsorted(self.bucket_ids[order], np.arange(len(self.buckets) + 1))
        self.members = {b: order[starts[b] : starts[b + 1]] for b in range(len(self.buckets)) if starts[b + 1] > starts[b]}
        self.counters["usable"] = len(kept)
        digest = hashlib.sha256(table.name.encode())
        for i, b in zip(self.source_ids.tolist(), self.bucket_ids.tolist()):
            digest.update(f"\n{source.keys[i]}\t{b}".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.source_ids)

    def bucket_of(self, position: int) -> Bucket:
        return self.buckets[int(self.bucket_ids[position])]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, epoch = item
        members = self.members[int(self.bucket_ids[position])]
        start = int(np.searchsorted(members, position))  # members are sorted positions
        events: list[tuple[str, str]] = []
        for step in range(len(members)):  # the sample, then the next ones of its bucket
            pos = int(members[(start + step) % len(members)])
            try:
                sample = self._load(pos, epoch)
            except Exception as exc:  # noqa: BLE001 - never fatal: record, try the next sample of the same bucket
                reason = getattr(exc, "reason", "load_failed")
                key = self.source.keys[int(self.source_ids[pos])]
                events.append((reason, f"{key}: {type(exc).__name__}: {exc}"))
                continue
            sample["events"] = events
            return sample
        bucket = self.bucket_of(position)
        raise RuntimeError(f"every one of the {len(members)} samples of bucket {bucket.key} failed to load: {events[:3]}")

    def _load(self, position: int, epoch: int) -> dict:
        i = int(self.source_ids[position])
        key = self.source.keys[i]
        bucket = self.bucket_of(position)
        try:
            candidates = caption_candidates(self.source.caption_value(i))
        except (ValueError, UnicodeDecodeError) as exc:  # CaptionError, malformed JSON, not UTF-8
            raise _Failure("bad_caption", str(exc)) from exc
        rng = np.random.default_rng([self.seed, epoch, i])
        caption, variant = choose_caption(candidates, rng)
        image = self.source.open_image(i)
        plan = plan_resize(*image.size, self.table)
        if plan is None or plan.bucket != bucket:
            raise _Failure("changed", f"decoded size {image.size} does not match the index {self.source.sizes[i]}")
        arr = np.asarray(apply_plan(image, plan), dtype=np.uint8)  # (H, W, 3)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1]
        sample = {"hq": (x - 0.5) / 0.5, "caption": caption, "key": key}  # parity: to_tensor then Normalize(0.5, 0.5)
        if self.embeddings is not None:
            sample["text"] = self._embedding(key, variant, caption)
        return sample

    def _embedding(self, key: str, variant: str | None, caption: str) -> torch.Tensor:
        from ..text import load_text_embedding

        path = embedding_path(self.embeddings, key, variant)
        if not path.is_file():
            raise _Failure("missing_embedding", f"{path} does not exist; run `pid-decoder embed --dataset`")
        emb, meta = load_text_embedding(path)
        if meta.get("prompt") != caption:
            raise _Failure("embedding_mismatch", f"{path} was made for another caption; rerun `pid-decoder embed --dataset`")
        return emb


class _Failure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def collate(samples: list[dict]) -> dict:
    """Stack one bucket's samples: hq (B, 3, H, W), caption/key lists, text (B, T, D) if present, events."""
    batch = {
        "hq": torch.stack([s["hq"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "events": [e for s in samples for e in s["events"]],
    }
    if "text" in samples[0]:
        batch["text"] = torch.stack([s["text"] for s in samples])  # (B, T, D)
    return batch


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batches:
    """One epoch's global batches: batch i is ``order[start[i]:end[i]]`` (positions of one bucket)."""

    order: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.order[self.start[i] : self.end[i]]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Shape-uniform, rank-sharded, deterministic batches; endless (epoch after epoch); resumable.

    Args:
        bucket_ids: bucket index of every dataset position.
        batch_size: samples per rank and step (B); global batches hold B x world samples.
        seed: with the epoch number, fixes the whole order.
        rank, world_size: this process's data-parallel rank and their count.
        shuffle: False keeps index order (validation).
        drop_last: drop each bucket's last global batch when it has fewer than B x world samples; otherwise it
            is kept (split into ``world`` near-equal parts) when it has at least ``world`` samples.
        fingerprint: identifies the dataset, checked on `load_state_dict`.

    Iterating yields lists of ``(position, epoch)``. `state_dict` is the position of the next batch this
    sampler will yield; behind a DataLoader with workers, which prefetch, checkpoint `BucketLoader.state_dict`.
    """

    def __init__(
        self,
        bucket_ids: np.ndarray | Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        fingerprint: str = "",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.shuffle, self.drop_last, self.fingerprint = shuffle, drop_last, fingerprint
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, _Batches] | None = None
        self.batches_per_epoch = len(self.global_batches(0))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self, epoch: int) -> _Batches:
        """The epoch's global batches (arrays of positions) in order; computed once per epoch, O(n) memory."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n, g = len(self.bucket_ids), self.global_batch_size
        perm = rng.permutation(n) if self.shuffle else np.arange(n)
        grouped = perm[np.argsort(self.bucket_ids[perm], kind="stable")]  # by bucket, shuffled within
        edges = [0, *(np.flatnonzero(np.diff(self.bucket_ids[grouped])) + 1).tolist(), n] if n else [0]
        starts, ends = [], []
        for lo, hi in itertools.pairwise(edges):  # one bucket's members: grouped[lo:hi]
            s = np.arange(lo, hi, g)
            e = np.minimum(s + g, hi)
            keep = (e - s == g) | ((e - s >= self.world_size) & (not self.drop_last))
            starts.append(s[keep])
            ends.append(e[keep])
        start = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        end = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        if self.shuffle:
            order = rng.permutation(len(start))
            start, end = start[order], end[order]
        batches = _Batches(grouped, start, end)
        self._cache = (epoch, batches)
        return batches

    def rank_batch(self, global_batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of a global batch."""
        return np.array_split(global_batch, self.world_size)[self.rank]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.batches_per_epoch == 0:
            return
        while True:
            batches = self.global_batches(self.epoch)
            while self.position < len(batches):
                batch = self.rank_batch(batches[self.position])
                epoch = self.epoch
                self.position += 1
                yield [(int(p), epoch) for p in batch]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return _position_state(self, self.epoch, self.position)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.epoch, self.position = _check_position(self, state, strict)


def _position_state(sampler: BucketBatchSampler, epoch: int, position: int) -> dict:
    return {
        "epoch": epoch,
        "position": position,  # index of the next global batch in the epoch
        "seed": sampler.seed,
        "global_batch_size": sampler.global_batch_size,
        "num_samples": len(sampler.bucket_ids),
        "fingerprint": sampler.fingerprint,
    }


def _check_position(sampler: BucketBatchSampler, state: dict, strict: bool) -> tuple[int, int]:
    mine = _position_state(sampler, 0, 0)
    diff = [k for k in ("seed", "global_batch_size", "num_samples", "fingerprint") if state.get(k) != mine[k]]
    if diff:
        detail = ", ".join(f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in diff)
        if strict:
            raise ValueError(
                f"the saved data position belongs to another data setup ({detail}); the order would not continue. "
                "Resume with the same dataset, seed and batch size x world size, or load with strict=False."
            )
        logger.warning("data position from another setup (%s): continuing at its epoch/position anyway", detail)
    epoch, position = int(state["epoch"]), int(state["position"])
    if position >= sampler.batches_per_epoch > 0:
        epoch, position = epoch + 1, 0
    return epoch, position


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingInfo:
    """A pre-pass output folder: its per-sample files, the empty caption's embedding and the encoder."""

    root: Path
    empty: torch.Tensor  # (T, D) float32
    encoder: str


def open_embeddings(root: str | os.PathLike) -> EmbeddingInfo:
    """Check a `pid-decoder embed --dataset` output folder: manifest present and complete, empty embedding."""
    from ..text import load_text_embedding

    root = Path(root)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not a text-embedding folder (no manifest.json); create it with "
            "`pid-decoder embed --dataset DATASET --out DIR`"
        )
    data = json.loads(manifest.read_text(encoding="utf-8"))
    if not data.get("complete"):
        raise ValueError(
            f"the text-embedding pre-pass in {str(root)!r} did not finish; run `pid-decoder embed --dataset` again "
            "(it skips the files already written)"
        )
    empty, _ = load_text_embedding(root / "empty.safetensors")
    return EmbeddingInfo(root, empty, str(data.get("encoder", "")))


class BucketLoader:
    """The training batches of one rank: an endless iterable of dicts, with a resumable position.

    Attributes: ``dataset`` (`BucketDataset`), ``sampler`` (`BucketBatchSampler`), ``empty_text`` ((T, D)
    embedding of the empty caption when embedding files are used, else None), ``counters`` (skipped and
    replaced samples by reason, plus ``indexed`` and ``usable``), ``epoch`` / ``position`` (of the next batch).
    """

    def __init__(self, dataset: BucketDataset, sampler: BucketBatchSampler, *, embeddings: EmbeddingInfo | None,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset, self.sampler = dataset, sampler
        self.empty_text = embeddings.empty if embeddings is not None else None
        self.embeddings = embeddings
        self.counters: Counter[str] = Counter(dataset.counters)
        self.epoch, self.position = sampler.epoch, sampler.position
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor or 2)
        self.dataloader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory,
            **kwargs,
        )

    def __len__(self) -> int:
        """Batches per epoch (iteration itself never ends)."""
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        self.sampler.epoch, self.sampler.position = self.epoch, self.position
        for batch in self.dataloader:
            for reason, message in batch.pop("events"):
                self.counters[reason] += 1
                self.counters["replaced"] += 1
                logger.warning("replaced a sample that failed to load (%s) %s", reason, message)
            self.position += 1
            if self.position >= self.sampler.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        """Position of the next batch the consumer will get (checkpoint this, not the sampler's)."""
        return _position_state(self.sampler, self.epoch, self.position)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.epoch, self.position = _check_position(self.sampler, state, strict)


def build_loader(
    dataset: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    buckets: str | BucketTable = "2048",
    batch_size: int = 1,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    shuffle: bool = True,
    drop_last: bool = False,
    kind: str = "auto",
    embeddings: str | os.PathLike | None = "auto",
    index_cache: str | os.PathLike | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> BucketLoader:
    """Index a dataset, assign buckets and return this rank's `BucketLoader`. Fails before any training.

    Args:
        dataset: an image folder, a folder of ``.tar`` shards, a brace pattern (``shards/{000..099}.tar``) or a
            list of shard files.
        buckets: a `buckets.BUCKET_TABLES` name ("2048", "multires_2048_3840", ...) or a `BucketTable`.
        batch_size: samples per rank and step; seed, rank, world_size, shuffle, drop_last: `BucketBatchSampler`.
        num_workers: DataLoader worker processes (0: load in this process).
        kind: "folder", "webdataset" or "auto" (a folder with ``.tar`` files and no images is a shard folder).
        embeddings: the `pid-decoder embed --dataset` output folder; "auto": ``DATASET/.text_embeddings`` when it
            exists; None: no embeddings (the trainer encodes captions with `TextEncoder`).
        index_cache: a JSON file that keeps the index (sizes, shard offsets) between runs; stale entries are
            re-read (size/mtime). None: index every time.

    Raises FileNotFoundError for a missing dataset or embedding folder, ValueError for an empty dataset, one with
    no usable sample, or too few samples for a single batch.
    """
    table = get_bucket_table(buckets)
    source = _open_source(dataset, kind, index_cache)
    emb_root: Path | None = None
    if embeddings == "auto":
        if isinstance(dataset, (str, os.PathLike)) and (Path(dataset) / EMBEDDINGS_DIRNAME).is_dir():
            emb_root = Path(dataset) / EMBEDDINGS_DIRNAME
    elif embeddings is not None:
        emb_root = Path(embeddings)
    emb_info = open_embeddings(emb_root) if emb_root is not None else None
    data = BucketDataset(source, table, embeddings=emb_info.root if emb_info else None, seed=seed)
    if len(data) == 0:
        skipped = {k: v for k, v in data.counters.items() if k not in ("indexed", "usable") and v}
        raise ValueError(
            f"no usable sample in {dataset!r}: {data.counters['indexed']} found, skipped {skipped}. Images must be at "
            f"least {table.min_size[0]}x{table.min_size[1]} for bucket table {table.name!r} and have a caption."
        )
    sampler = BucketBatchSampler(
        data.bucket_ids, batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
        drop_last=drop_last, fingerprint=data.fingerprint,
    )
    if sampler.batches_per_epoch == 0:
        sizes = Counter(data.bucket_of(i).key for i in range(len(data)))
        raise ValueError(
            f"no bucket of {dataset!r} holds a full global batch of {sampler.global_batch_size} samples "
            f"(batch_size {batch_size} x world_size {world_size}); bucket sizes {dict(sizes)}. Lower the batch size "
            "or pass drop_last=False."
        )
    logger.info(
        "dataset %s: %d usable of %d samples in %d buckets, %d batches per epoch (%s)",
        dataset, len(data), data.counters["indexed"], len(data.members), sampler.batches_per_epoch,
        ", ".join(f"{k} {v}" for k, v in data.counters.items() if k not in ("indexed", "usable") and v) or "none skipped",
    )
    return BucketLoader(data, sampler, embeddings=emb_info, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor)


def _open_source(dataset, kind: str, index_cache):
    if kind not in ("auto", "folder", "webdataset"):
        raise ValueError(f"dataset kind must be 'auto', 'folder' or 'webdataset', got {kind!r}")
    if kind == "auto":
        kind = _detect_kind(dataset)
    if kind == "folder":
        source = ImageFolderSource(dataset, index_cache=index_cache)
        if len(source) + sum(source.counters.values()) == 0:
            raise ValueError(f"dataset folder {str(dataset)!r} holds no images ({', '.join(IMAGE_EXTS)})")
        return source
    return WebDatasetSource(dataset, index_cache=index_cache)


def _detect_kind(dataset) -> str:
    if not isinstance(dataset, (str, os.PathLike)):
        return "webdataset"  # a list of shard files
    text = os.fspath(dataset)
    path = Path(text)
    if "{" in text or path.suffix == ".tar":
        return "webdataset"
    if not path.exists():
        raise FileNotFoundError(f"dataset {text!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"dataset {text!r} must be an image folder, a shard folder or .tar files")
    has_tar = next((True for p in path.rglob("*.tar")), False)
    has_image = next((True for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS), False)
    if has_tar and has_image:
        raise ValueError(f"{text!r} holds both images and .tar shards; pass kind='folder' or kind='webdataset'")
    return "webdataset" if has_tar else "folder"
