"""Aspect-ratio buckets of the reference's training data: tables, assignment, resize + centre-crop rule.

Two kinds of tables (spec training-details.md §1.2-§1.3):

- **single resolution** (the `..._1bs_2048` / `..._2bs_2048` loaders): one bucket per aspect ratio, 7 ratios,
  target sizes from the reference's ``IMAGE_RES_SIZE_INFO["2048"]`` row; an image slightly smaller than its
  target (``rho > 0.9``) is upscaled ("near-miss rescue"), a smaller one is dropped.
- **multi resolution** (`..._multires_2048_{3072,3840,4096}`): 5 ratios x levels 2048, 2304, ... (step 256) up to
  the maximum; each bucket is ``round64(L*sqrt(r)) x round64(L/sqrt(r))`` capped by the per-ratio ceiling of the
  ``IMAGE_RES_SIZE_INFO[max]`` row. An image goes to the largest level that fits inside it; an image smaller
  than the lowest level is dropped. Never upscales.

Every image is then resized "adaptively" (continuous downsample so the binding side lands exactly on the target,
the other side to the ceiling of its scaled length), with PIL LANCZOS, and centre-cropped to the bucket size.
Sizes are (W, H) pairs throughout, as in the reference's tables.

Tables are data: the released ones are module constants built once (`BUCKET_TABLES`); `single_resolution_table`
and `multires_table` build others (tests use tiny ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Ratio = tuple[int, int]  # (a, b) for the aspect ratio a:b = W:H

# The reference's IMAGE_RES_SIZE_INFO, (W, H) per preset and aspect ratio (spec §1.3). The "2048" row is the
# single-resolution target; the other rows are per-ratio ceilings of the multi-resolution grid.
IMAGE_RES_SIZE_INFO: dict[str, dict[Ratio, tuple[int, int]]] = {
    "1024": {(1, 1): (1024, 1024), (4, 3): (1152, 896), (3, 4): (896, 1152), (16, 9): (1344, 768),
             (9, 16): (768, 1344), (3, 2): (1344, 896), (2, 3): (896, 1344)},
    "2048": {(1, 1): (2048, 2048), (4, 3): (2304, 1728), (3, 4): (1728, 2304), (16, 9): (2688, 1536),
             (9, 16): (1536, 2688), (3, 2): (2688, 1792), (2, 3): (1792, 2688)},
    "3072": {(1, 1): (3072, 3072), (4, 3): (3520, 2688), (3, 4): (2688, 3520), (16, 9): (4096, 2304),
             (9, 16): (2304, 4096), (3, 2): (3776, 2496), (2, 3): (2496, 3776)},
    "3840": {(1, 1): (3584, 3584), (4, 3): (4096, 2816), (3, 4): (2816, 4096), (16, 9): (4096, 2176),
             (9, 16): (2176, 4096), (3, 2): (4096, 2688), (2, 3): (2688, 4096)},
    "4096": {(1, 1): (4096, 4096), (4, 3): (4096, 3072), (3, 4): (3072, 4096), (16, 9): (4096, 2304),
             (9, 16): (2304, 4096), (3, 2): (4096, 2688), (2, 3): (2688, 4096)},
}

# In tie-break order: on equal log distance the first ratio wins.
SINGLE_RES_RATIOS: tuple[Ratio, ...] = ((16, 9), (3, 2), (4, 3), (1, 1), (3, 4), (2, 3), (9, 16))
MULTI_RES_RATIOS: tuple[Ratio, ...] = ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))
RESCUE_THRESHOLD = 0.9  # single-res near-miss upscale (TD dataloader_pixeldit.py 64)


@dataclass(frozen=True)
class Bucket:
    """One shape-uniform bucket: every image in it is resized and cropped to ``width x height``."""

    key: str  # "16,9" (single-res) or "L2048_16,9" (multi-res), as the reference names them
    width: int
    height: int
    ratio: Ratio
    level: int | None = None  # multi-res level L, None for single-res


@dataclass(frozen=True)
class BucketTable:
    """A set of buckets plus the rule that maps a native size to one of them.

    ``buckets_by_ratio[i]`` holds the buckets of ``ratios[i]`` by ascending level (one bucket for single-res).
    ``rescue`` is the single-res near-miss threshold (None: never upscale, the multi-res rule).
    """

    name: str
    ratios: tuple[Ratio, ...]
    buckets_by_ratio: tuple[tuple[Bucket, ...], ...]
    rescue: float | None

    def __post_init__(self) -> None:
        if len(self.ratios) != len(self.buckets_by_ratio) or not self.ratios:
            raise ValueError("a bucket table needs one non-empty bucket list per ratio")
        if any(not b for b in self.buckets_by_ratio):
            raise ValueError(f"bucket table {self.name!r} has a ratio without buckets")

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        """Every bucket, ratio by ratio (unreachable duplicate-size levels included)."""
        return tuple(b for group in self.buckets_by_ratio for b in group)

    @property
    def min_size(self) -> tuple[int, int]:
        """The smallest (W, H) over the lowest bucket of each ratio: no image smaller than both can be kept."""
        return (min(g[0].width for g in self.buckets_by_ratio), min(g[0].height for g in self.buckets_by_ratio))


def closest_ratio(width: int, height: int, ratios: Sequence[Ratio]) -> int:
    """Index of the ratio a:b nearest to width/height in log space; the first one wins ties."""
    log_r = math.log(width / height)
    dists = [abs(log_r - math.log(a / b)) for a, b in ratios]
    return dists.index(min(dists))


def round64(x: float, multiple: int = 64) -> int:
    """``multiple * round(x / multiple)`` with Python's round (half to even), as the reference rounds."""
    return multiple * round(x / multiple)


def single_resolution_table(
    sizes: str | Mapping[Ratio, tuple[int, int]] = "2048",
    *,
    ratios: Sequence[Ratio] = SINGLE_RES_RATIOS,
    rescue: float | None = RESCUE_THRESHOLD,
    name: str | None = None,
) -> BucketTable:
    """One bucket per ratio at the sizes of an ``IMAGE_RES_SIZE_INFO`` row (or a given {ratio: (W, H)})."""
    label = sizes if isinstance(sizes, str) else "custom"
    if isinstance(sizes, str):
        if sizes not in IMAGE_RES_SIZE_INFO:
            raise ValueError(f"unknown resolution preset {sizes!r}; expected one of {sorted(IMAGE_RES_SIZE_INFO)}")
        sizes = IMAGE_RES_SIZE_INFO[sizes]
    missing = [r for r in ratios if r not in sizes]
    if missing:
        raise ValueError(f"no target size for ratio(s) {missing}")
    groups = tuple((Bucket(f"{a},{b}", *sizes[(a, b)], (a, b)),) for a, b in ratios)
    return BucketTable(name or f"single_{label}", tuple(ratios), groups, rescue)


def multires_table(
    max_resolution: int = 3840,
    *,
    levels: Sequence[int] | None = None,
    ratios: Sequence[Ratio] = MULTI_RES_RATIOS,
    ceilings: Mapping[Ratio, tuple[int, int]] | None = None,
    multiple: int = 64,
    name: str | None = None,
) -> BucketTable:
    """The multi-resolution grid: levels 2048..max_resolution (step 256), per-ratio ceilings of that preset.

    Bucket (W, H) = (min(round64(L*sqrt(r)), W_cap), min(round64(L/sqrt(r)), H_cap)) for r = a/b. ``levels``,
    ``ceilings`` and ``multiple`` override the released values (small tables for tests).
    """
    if levels is None:
        levels = range(2048, max_resolution + 1, 256)
    levels = sorted(int(v) for v in levels if v <= max_resolution)
    if not levels:
        raise ValueError(f"no level <= max_resolution {max_resolution}")
    if ceilings is None:
        if str(max_resolution) not in IMAGE_RES_SIZE_INFO:
            raise ValueError(
                f"no ceilings for max_resolution {max_resolution}; expected one of {sorted(IMAGE_RES_SIZE_INFO)} "
                "or pass ceilings={ratio: (W, H)}"
            )
        ceilings = IMAGE_RES_SIZE_INFO[str(max_resolution)]
    groups = []
    for a, b in ratios:
        w_cap, h_cap = ceilings[(a, b)]
        sqrt_r = math.sqrt(a / b)
        group = tuple(
            Bucket(
                f"L{lv}_{a},{b}",
                min(round64(lv * sqrt_r, multiple), w_cap),
                min(round64(lv / sqrt_r, multiple), h_cap),
                (a, b),
                lv,
            )
            for lv in levels
        )
        groups.append(group)
    return BucketTable(name or f"multires_{levels[0]}_{max_resolution}", tuple(ratios), tuple(groups), None)


def assign_bucket(width: int, height: int, table: BucketTable) -> Bucket | None:
    """The bucket of an image of native size ``width x height``, or None if the image is dropped.

    Single-res: the nearest ratio's bucket, unless the image is smaller than it by more than the rescue
    threshold. Multi-res: the largest level of the nearest ratio whose size fits inside the image.
    """
    return _assign(int(width), int(height), table)[0]


def _assign(width: int, height: int, table: BucketTable) -> tuple[Bucket | None, tuple[int, int] | None]:
    if width < 1 or height < 1:
        return None, None
    group = table.buckets_by_ratio[closest_ratio(width, height, table.ratios)]
    if table.rescue is None:
        fitting = [b for b in group if width >= b.width and height >= b.height]
        if not fitting:
            return None, None
        bucket = max(fitting, key=lambda b: b.level or 0)  # the largest level that fits
        return bucket, adaptive_size(width, height, bucket.width, bucket.height)
    bucket = group[0]
    w, h = adaptive_size(width, height, bucket.width, bucket.height)
    if w >= bucket.width and h >= bucket.height:
        return bucket, (w, h)
    rho = min(h / bucket.height, w / bucket.width)
    if rho <= table.rescue:
        return None, None
    # near-miss rescue: upscale so the short side reaches the target (the reference's int(x + 0.5) rounding)
    return bucket, (max(int(w / rho + 0.5), bucket.width), max(int(h / rho + 0.5), bucket.height))


def adaptive_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """The reference's "adaptive" resize: scale down by s = min(W/W_t, H/H_t) when s > 1, else keep.

    The binding side lands exactly on the target and the other becomes ceil(side / s) (at least its target).
    Computed in exact integer arithmetic, so a binding side never ends one pixel over its target.
    """
    if width * target_h <= height * target_w:  # width binds: s = W / W_t
        if width <= target_w:  # s <= 1: no downscale
            return width, height
        return target_w, max(target_h, -(-height * target_w // width))
    if height <= target_h:
        return width, height
    return max(target_w, -(-width * target_h // height)), target_h


@dataclass(frozen=True)
class ResizePlan:
    """How one image becomes a bucket tensor: resize to ``resize`` (None: keep), then crop ``box``."""

    bucket: Bucket
    resize: tuple[int, int] | None  # (W, H) after the LANCZOS resize, None when the native size is kept
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the centre crop, PIL order


def plan_resize(width: int, height: int, table: BucketTable) -> ResizePlan | None:
    """The bucket, resize size and centre-crop box of a ``width x height`` image; None if it is dropped.

    Crop offsets follow torchvision's ``center_crop``: ``int(round((size - target) / 2))`` with Python's
    round-half-even (spec §1.2, Q12).
    """
    bucket, size = _assign(int(width), int(height), table)
    if bucket is None or size is None:
        return None
    w, h = size
    left = round((w - bucket.width) / 2)
    top = round((h - bucket.height) / 2)
    resize = None if (w, h) == (width, height) else (w, h)
    return ResizePlan(bucket, resize, (left, top, left + bucket.width, top + bucket.height))


def apply_plan(image, plan: ResizePlan):
    """Resize (PIL LANCZOS) and centre-crop a PIL image as `plan_resize` decided; returns a PIL image."""
    from PIL import Image

    if plan.resize is not None:
        image = image.resize(plan.resize, Image.Resampling.LANCZOS)
    return image.crop(plan.box)


SINGLE_RES_2048 = single_resolution_table("2048")
SINGLE_RES_1024 = single_resolution_table("1024")
MULTIRES_2048_3072 = multires_table(3072)
MULTIRES_2048_3840 = multires_table(3840)
MULTIRES_2048_4096 = multires_table(4096)

# Names used by training configs: "2048" is the reference's `..._2048` single-res loader, "multires_2048_3840"
# its `..._multires_2048_3840` loader.
BUCKET_TABLES: dict[str, BucketTable] = {
    "2048": SINGLE_RES_2048,
    "1024": SINGLE_RES_1024,
    "multires_2048_3072": MULTIRES_2048_3072,
    "multires_2048_3840": MULTIRES_2048_3840,
    "multires_2048_4096": MULTIRES_2048_4096,
}


def get_bucket_table(name: str | BucketTable) -> BucketTable:
    """A released table by name (see `BUCKET_TABLES`), or ``name`` itself if it already is a table."""
    if isinstance(name, BucketTable):
        return name
    if name not in BUCKET_TABLES:
        raise ValueError(f"unknown bucket table {name!r}; expected one of {', '.join(BUCKET_TABLES)}")
    return BUCKET_TABLES[name]
