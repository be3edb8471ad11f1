"""Training data: bucket tables and the resize/crop rule, image folders and WebDataset shards, the resumable
rank-sharded sampler, the LQ condition (noise frames, dropout, encoders) and the text-embedding pre-pass.

The released tables are checked as pure functions; loaders run on tiny images with tiny custom tables.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pid_decoder.training.buckets import (
    MULTIRES_2048_3840,
    MULTIRES_2048_4096,
    SINGLE_RES_2048,
    assign_bucket,
    multires_table,
    plan_resize,
    single_resolution_table,
)
from pid_decoder.training.conditioning import (
    LatentEncoder,
    LQConditioner,
    apply_caption_dropout,
    draw_latent_noise,
    dropout_mask,
    latent_noise,
)
from pid_decoder.training.data import BucketBatchSampler, build_loader, caption_candidates
from pid_decoder.training.degrade import downsample_lq

# Tiny single-res table: 3 ratios, 32-px buckets, the reference's 0.9 rescue.
TINY = single_resolution_table({(4, 3): (32, 24), (1, 1): (32, 32), (3, 4): (24, 32)},
                               ratios=((4, 3), (1, 1), (3, 4)), name="tiny")


# --------------------------------------------------------------------------- bucket tables (pure functions)
def test_multires_3840_grid_is_the_reference_table():
    """Spec §1.3: the 2048->3840 grid, duplicate levels and the 3584 square ceiling included."""
    by_key = {b.key: (b.width, b.height) for b in MULTIRES_2048_3840.buckets}
    expected = {
        "1,1": [2048, 2304, 2560, 2816, 3072, 3328, 3584, 3584],
        "4,3": [(2368, 1792), (2688, 1984), (2944, 2240), (3264, 2432), (3520, 2688), (3840, 2816), (4096, 2816),
                (4096, 2816)],
        "16,9": [(2752, 1536), (3072, 1728), (3392, 1920), (3776, 2112)] + [(4096, 2176)] * 4,
    }
    levels = range(2048, 3841, 256)
    for ratio, sizes in expected.items():
        for level, size in zip(levels, sizes):
            size = (size, size) if isinstance(size, int) else size
            assert by_key[f"L{level}_{ratio}"] == size, (level, ratio)
            a, b = ratio.split(",")
            assert by_key[f"L{level}_{b},{a}"] == size[::-1]  # portrait = transpose
    assert len(MULTIRES_2048_3840.buckets) == 5 * 8
    assert max(b.width for b in MULTIRES_2048_4096.buckets) == 4096


def test_single_res_2048_targets():
    sizes = {b.key: (b.width, b.height) for b in SINGLE_RES_2048.buckets}
    assert sizes == {"16,9": (2688, 1536), "3,2": (2688, 1792), "4,3": (2304, 1728), "1,1": (2048, 2048),
                     "3,4": (1728, 2304), "2,3": (1792, 2688), "9,16": (1536, 2688)}


@pytest.mark.parametrize(
    "table, native, key, resize, box",
    [
        # multi-res: largest fitting level of the nearest of 5 ratios; binding side exact, the other ceil'ed
        (MULTIRES_2048_3840, (4000, 3000), "L3328_4,3", (3840, 2880), (0, 32, 3840, 2848)),
        (MULTIRES_2048_3840, (3000, 3000), "L2816_1,1", (2816, 2816), (0, 0, 2816, 2816)),
        (MULTIRES_2048_3840, (5000, 5000), "L3840_1,1", (3584, 3584), (0, 0, 3584, 3584)),  # 3584 ceiling
        (MULTIRES_2048_3840, (3600, 2400), "L2560_4,3", (3360, 2240), (208, 0, 3152, 2240)),  # 3:2 -> 4:3
        (MULTIRES_2048_3840, (4200, 1800), "L2304_16,9", (4032, 1728), (480, 0, 3552, 1728)),  # 21:9 -> 16:9
        (MULTIRES_2048_3840, (2200, 4000), "L2816_9,16", (2112, 3840), (0, 32, 2112, 3808)),
        (MULTIRES_2048_3840, (2752, 1536), "L2048_16,9", None, (0, 0, 2752, 1536)),  # exact fit: no resize
        (MULTIRES_2048_3840, (2047, 2047), None, None, None),  # below the 2048 level: dropped
        (MULTIRES_2048_3840, (2700, 1600), None, None, None),  # 16:9 but narrower than 2752: dropped
        # single-res 2048: 7 ratios, near-miss rescue (rho > 0.9) upscales, else dropped
        (SINGLE_RES_2048, (2048, 2048), "1,1", None, (0, 0, 2048, 2048)),
        (SINGLE_RES_2048, (3000, 2000), "3,2", (2688, 1792), (0, 0, 2688, 1792)),
        (SINGLE_RES_2048, (4000, 2000), "16,9", (3072, 1536), (192, 0, 2880, 1536)),
        (SINGLE_RES_2048, (1900, 1900), "1,1", (2048, 2048), (0, 0, 2048, 2048)),  # rho 0.928: rescued
        (SINGLE_RES_2048, (2100, 2000), "1,1", (2150, 2048), (51, 0, 2099, 2048)),  # rescue int(x + 0.5)
        (SINGLE_RES_2048, (1800, 1800), None, None, None),  # rho 0.879: dropped
    ],
)
def test_bucket_assignment_and_resize(table, native, key, resize, box):
    plan = plan_resize(*native, table)
    bucket = assign_bucket(*native, table)
    if key is None:
        assert plan is None and bucket is None
        return
    assert bucket.key == key and plan.bucket == bucket
    assert plan.resize == resize and plan.box == box
    assert (box[2] - box[0], box[3] - box[1]) == (bucket.width, bucket.height)


def test_centre_crop_rounds_half_to_even():
    """torchvision's int(round((size - target) / 2)): offsets 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (spec Q12)."""
    table = single_resolution_table({(1, 1): (16, 16)}, ratios=((1, 1),), rescue=None)
    lefts = [plan_resize(w, 16, table).box[0] for w in (17, 19, 21)]
    assert lefts == [0, 2, 2]


def test_multires_rule_on_a_tiny_table():
    table = multires_table(64, levels=(32, 48, 64), ceilings={r: (64, 64) for r in ((16, 9), (4, 3), (1, 1), (3, 4), (9, 16))},
                           multiple=16)
    assert [(b.key, b.width, b.height) for b in table.buckets_by_ratio[2]] == [
        ("L32_1,1", 32, 32), ("L48_1,1", 48, 48), ("L64_1,1", 64, 64)]
    assert [(b.width, b.height) for b in table.buckets_by_ratio[0]] == [(48, 32), (64, 32), (64, 48)]  # capped
    assert assign_bucket(50, 50, table).key == "L48_1,1"
    assert assign_bucket(31, 40, table) is None


# --------------------------------------------------------------------------- captions
def test_caption_rules():
    assert caption_candidates("a cat") == [("a cat", None)]
    assert caption_candidates({"caption": "a dog"}) == [("a dog", None)]
    nested = {"captions_qwen2p5_7b_v4": {"caption": {"prompt": "long", "prompt_medium": "", "prompt_short": "s"}}}
    assert caption_candidates(nested) == [("long", "prompt"), ("s", "prompt_short")]
    for bad in ({"caption": "a", "captions_qwen2p5_7b_v4": "b"}, {"caption": {"prompt": ""}}, {"other": 1}, 3):
        with pytest.raises(ValueError):
            caption_candidates(bad)


# --------------------------------------------------------------------------- noise frames and dropout
def test_latent_noise_frames():
    z = torch.tensor([1.0, 2.0, -1.0]).view(3, 1, 1, 1).expand(3, 2, 1, 1).contiguous()
    eps = torch.full_like(z, 0.5)
    apply = torch.tensor([True, True, False])
    sigma = torch.tensor([0.6, 0.0, 0.3])
    flow, s_flow = latent_noise(z, apply=apply, sigma=sigma, eps=eps, frame="flow")
    vp, s_vp = latent_noise(z, apply=apply, sigma=sigma, eps=eps, frame="sdxl")
    assert torch.allclose(flow[:, 0, 0, 0], torch.tensor([0.4 * 1 + 0.6 * 0.5, 2.0, -1.0]))
    assert torch.allclose(vp[:, 0, 0, 0], torch.tensor([0.8 * 1 + 0.6 * 0.5, 2.0, -1.0]))  # sqrt(1 - 0.36) = 0.8
    assert torch.equal(s_flow, torch.tensor([0.6, 0.0, 0.0])) and torch.equal(s_vp, s_flow)
    assert flow.dtype == torch.float32
    with pytest.raises(ValueError, match="noise frame"):
        latent_noise(z, apply=apply, sigma=sigma, eps=eps, frame="ve")


def test_noise_and_dropout_draws_are_pinned_by_the_generator():
    apply, sigma, eps = draw_latent_noise((4, 2, 3, 3), torch.Generator().manual_seed(3), prob=0.75, sigma_max=0.8)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(apply, torch.rand(4, generator=g) < 0.75)
    assert torch.equal(sigma, 0.8 * torch.rand(4, generator=g))
    assert torch.equal(eps, torch.randn(4, 2, 3, 3, generator=g))
    # nothing selected: no sigma / eps draws (the reference's RNG order)
    g = torch.Generator().manual_seed(0)
    apply, sigma, eps = draw_latent_noise((2, 1, 1, 1), g, prob=0.0)
    assert not apply.any() and eps is None and torch.equal(sigma, torch.zeros(2))
    assert torch.equal(g.get_state(), _after_rand(0, 2))
    drop = dropout_mask(8, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(drop, torch.rand(8, generator=torch.Generator().manual_seed(1)) < 0.5)


def _after_rand(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.rand(n, generator=g)
    return g.get_state()


def test_caption_dropout_with_embeddings():
    text = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    empty = torch.full((3, 4), -1.0)
    captions, out = apply_caption_dropout(["a", "b"], torch.tensor([False, True]), text, empty)
    assert captions == ["a", ""] and torch.equal(out[0], text[0]) and torch.equal(out[1], empty)
    with pytest.raises(ValueError, match="empty_text"):
        apply_caption_dropout(["a", "b"], torch.tensor([False, True]), text)


# --------------------------------------------------------------------------- image folders
def _save(path: Path, w: int, h: int, seed: int = 0, fmt: str | None = None) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _folder(root: Path) -> Path:
    _save(root / "a.png", 32, 32, 1)
    (root / "a.txt").write_text("caption a\n")
    _save(root / "sub" / "b.png", 40, 30, 2)  # 4:3, downscaled to 32x24
    _save(root / "sub" / "c.webp", 24, 32, 3, fmt="WEBP")
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.png", "text": "caption b"}) + "\n"
        + json.dumps({"file_name": "c.webp", "text": {"prompt": "long c", "prompt_short": "c"}}) + "\n")
    _save(root / "small.png", 20, 20, 4)  # rho 0.625: too small
    (root / "small.txt").write_text("small")
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "broken.txt").write_text("broken")
    _save(root / "nocap.png", 32, 32, 5)
    return root


def test_image_folder_captions_buckets_and_skips(tmp_path):
    root = _folder(tmp_path / "ds")
    loader = build_loader(root, buckets=TINY, batch_size=1, num_workers=0, shuffle=False)
    c = loader.counters
    assert (c["usable"], c["indexed"], c["too_small"], c["corrupt"], c["no_caption"]) == (3, 6, 1, 1, 1)
    batches = [b for _, b in zip(range(3), loader)]
    got = {b["key"][0]: b for b in batches}
    assert set(got) == {"a", "sub/b", "sub/c"}
    assert got["a"]["caption"] == ["caption a"] and got["sub/b"]["caption"] == ["caption b"]
    assert got["sub/c"]["caption"][0] in ("long c", "c")
    assert got["sub/b"]["hq"].shape == (1, 3, 24, 32) and got["sub/c"]["hq"].shape == (1, 3, 32, 24)
    # pixels: PIL LANCZOS to 32x24, then (x / 255 - 0.5) / 0.5
    ref = Image.open(root / "sub" / "b.png").convert("RGB").resize((32, 24), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(got["sub/b"]["hq"][0], (x - 0.5) / 0.5)
    x_a = torch.from_numpy(np.asarray(Image.open(root / "a.png")).copy()).permute(2, 0, 1).float()
    assert torch.allclose(got["a"]["hq"][0], x_a / 127.5 - 1, atol=1e-6)
    assert "text" not in got["a"]


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(tmp_path / "nope", buckets=TINY, num_workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_loader(tmp_path / "empty", buckets=TINY, num_workers=0)
    _save(tmp_path / "small" / "x.png", 8, 8)
    (tmp_path / "small" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no usable sample.*too_small"):
        build_loader(tmp_path / "small", buckets=TINY, num_workers=0)
    with pytest.raises(ValueError, match="full global batch"):
        build_loader(_folder(tmp_path / "ds"), buckets=TINY, batch_size=4, drop_last=True, num_workers=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_load_failure_is_replaced_and_counted(tmp_path, workers):
    root = tmp_path / "ds"
    for i in range(3):
        _save(root / f"{i}.png", 32, 32, i)
        (root / f"{i}.txt").write_text(f"c{i}")
    cut = (root / "1.png").read_bytes()
    (root / "1.png").write_bytes(cut[: len(cut) // 2])  # header fine, data truncated
    loader = build_loader(root, buckets=TINY, batch_size=1, num_workers=workers, shuffle=False)
    keys = [b["key"][0] for _, b in zip(range(3), loader)]
    assert keys == ["0", "2", "2"]  # sample 1 replaced by the next sample of its bucket
    assert loader.counters["load_failed"] == 1 and loader.counters["replaced"] == 1


def test_index_cache_is_reused_and_refreshed(tmp_path):
    root = _folder(tmp_path / "ds")
    cache = tmp_path / "index.json"
    first = build_loader(root, buckets=TINY, num_workers=0, index_cache=cache)
    entries = json.loads(cache.read_text())["entries"]
    assert entries["a.png"][2:4] == [32, 32]
    _save(root / "a.png", 64, 48, 9)  # changed file: re-read, new bucket
    second = build_loader(root, buckets=TINY, num_workers=0, index_cache=cache)
    assert json.loads(cache.read_text())["entries"]["a.png"][2:4] == [64, 48]
    assert first.dataset.fingerprint != second.dataset.fingerprint


# --------------------------------------------------------------------------- WebDataset shards
def _png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shards(folder: Path) -> Path:
    import webdataset as wds

    folder.mkdir()
    with wds.TarWriter(str(folder / "000000.tar")) as sink:
        sink.write({"__key__": "s0", "png": _png(32, 32, 0), "txt": "zero"})
        sink.write({"__key__": "s1", "png": _png(40, 30, 1), "json": json.dumps({"caption": {"prompt": "one"}})})
        sink.write({"__key__": "bad", "jpg": b"\xff\xd8 broken", "txt": "bad"})
    with wds.TarWriter(str(folder / "000001.tar")) as sink:
        sink.write({"__key__": "s2", "png": _png(32, 32, 2), "txt": "two"})
        sink.write({"__key__": "tiny", "png": _png(10, 10, 3), "txt": "tiny"})
        sink.write({"__key__": "nocap", "png": _png(32, 32, 4)})
    return folder


def test_webdataset_shards(tmp_path):
    import webdataset as wds

    folder = _shards(tmp_path / "shards")
    loader = build_loader(folder, buckets=TINY, batch_size=1, num_workers=0, shuffle=False)
    c = loader.counters
    assert (c["usable"], c["corrupt"], c["too_small"], c["no_caption"]) == (3, 1, 1, 1)
    got = {b["key"][0]: b for _, b in zip(range(3), loader)}
    assert set(got) == {"000000/s0", "000000/s1", "000001/s2"}
    assert got["000000/s1"]["caption"] == ["one"] and got["000000/s1"]["hq"].shape == (1, 3, 24, 32)
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(_png(32, 32, 2)))).copy()).permute(2, 0, 1).float()
    assert torch.allclose(got["000001/s2"]["hq"][0], x / 127.5 - 1, atol=1e-6)
    # the reference's layout: image/<rel>.tar + caption/<rel>.tar with the same sample keys
    two = tmp_path / "modal"
    for modality, sample in (("image", {"png": _png(40, 30, 1)}), ("caption", {"json": json.dumps({"caption": "c"})})):
        (two / modality / "part_000000").mkdir(parents=True)
        with wds.TarWriter(str(two / modality / "part_000000" / "000000.tar")) as sink:
            sink.write({"__key__": "u1", **sample})
    paired = build_loader(two, buckets=TINY, num_workers=0)
    batch = next(iter(paired))
    assert batch["key"] == ["000000/u1"] and batch["caption"] == ["c"]
    assert batch["hq"].shape == (1, 3, 24, 32) and paired.counters["indexed"] == 1
    # the same shards by brace pattern and with two workers give the same batches
    pattern = str(folder / "{000000..000001}.tar")
    again = build_loader(pattern, buckets=TINY, batch_size=1, num_workers=2, shuffle=False)
    assert [b["key"][0] for _, b in zip(range(3), again)] == [b["key"][0] for b in got.values()]


def test_shard_member_names_cannot_escape(tmp_path):
    import tarfile

    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "000000.tar", "w") as tf:
        for name, data in (("../evil.png", _png(32, 32, 0)), ("../evil.txt", b"x"),
                           ("ok.png", _png(32, 32, 1)), ("ok.txt", b"fine")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    loader = build_loader(folder, buckets=TINY, num_workers=0)
    assert loader.counters["usable"] == 1 and next(iter(loader))["key"] == ["000000/ok"]


def test_mixed_folder_needs_a_kind(tmp_path):
    _shards(tmp_path / "mixed")
    _save(tmp_path / "mixed" / "x.png", 32, 32)
    (tmp_path / "mixed" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="kind='folder' or kind='webdataset'"):
        build_loader(tmp_path / "mixed", buckets=TINY, num_workers=0)
    assert build_loader(tmp_path / "mixed", buckets=TINY, num_workers=0, kind="folder").counters["usable"] == 1


# --------------------------------------------------------------------------- sampler
def _bucket_ids(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 3, n)


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_is_deterministic_shape_uniform_and_epoch_dependent():
    ids = _bucket_ids()
    a = BucketBatchSampler(ids, 4, seed=7, drop_last=True)
    b = BucketBatchSampler(ids, 4, seed=7, drop_last=True)
    n = a.batches_per_epoch
    first, second = _take(a, 2 * n), _take(b, 2 * n)
    assert first == second
    for batch in first:
        assert len(batch) == 4 and len({int(ids[p]) for p, _ in batch}) == 1  # one bucket per batch
    epoch0 = [p for batch in first[:n] for p, _ in batch]
    assert len(set(epoch0)) == len(epoch0)  # no repeats within an epoch
    assert {e for batch in first[n:] for _, e in batch} == {1}
    assert [p for batch in first[n:] for p, _ in batch] != epoch0  # reshuffled per epoch
    assert _take(BucketBatchSampler(ids, 4, seed=8, drop_last=True), n) != first[:n]


def test_sampler_ranks_are_disjoint_and_cover_the_single_process_batches():
    ids = _bucket_ids()
    single = BucketBatchSampler(ids, 4, seed=3, drop_last=True)
    one = _take(single, single.batches_per_epoch)
    r0 = BucketBatchSampler(ids, 2, seed=3, rank=0, world_size=2, drop_last=True)
    r1 = BucketBatchSampler(ids, 2, seed=3, rank=1, world_size=2, drop_last=True)
    assert r0.batches_per_epoch == r1.batches_per_epoch == len(one)
    for step, (b0, b1) in enumerate(zip(_take(r0, len(one)), _take(r1, len(one)))):
        assert not set(b0) & set(b1)
        assert sorted(b0 + b1) == sorted(one[step])  # same step = the one-process global batch
        assert len({int(ids[p]) for p, _ in b0 + b1}) == 1  # every rank in the same bucket


def test_loader_resume_continues_exactly(tmp_path):
    root = tmp_path / "ds"
    for i in range(10):
        w, h = [(32, 32), (40, 30), (30, 40)][i % 3]
        _save(root / f"{i:02d}.png", w, h, i)
        (root / f"{i:02d}.txt").write_text(f"c{i}")
    kw = {"buckets": TINY, "batch_size": 2, "seed": 5, "num_workers": 2}
    loader = build_loader(root, **kw)
    assert len(loader) == 6  # buckets of 4, 3 and 3 samples: 2 + 2 + 2 batches (partial tails kept)
    stream = iter(loader)
    reference = [next(stream) for _ in range(12)]  # crosses two epoch boundaries
    again = build_loader(root, **kw)
    it = iter(again)
    for _ in range(7):
        next(it)
    state = again.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)
    resumed = build_loader(root, **kw)
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(5), resumed)]
    for got, want in zip(rest, reference[7:12]):
        assert got["key"] == want["key"] and torch.equal(got["hq"], want["hq"])
    # two ranks of the same run: disjoint samples, the same bucket at every step
    ranks = [build_loader(root, **{**kw, "batch_size": 1, "world_size": 2, "rank": r, "num_workers": 0})
             for r in (0, 1)]
    steps = [[b for _, b in zip(range(len(r)), r)] for r in ranks]
    seen = [k for rank_steps in steps for b in rank_steps for k in b["key"]]
    assert len(seen) == len(set(seen)) == 8  # each 3-sample bucket's tail of 1 cannot be split over 2 ranks
    assert all(a["hq"].shape == b["hq"].shape for a, b in zip(*steps))
    with pytest.raises(ValueError, match="another data setup"):
        build_loader(root, **{**kw, "seed": 6}).load_state_dict(state)


# --------------------------------------------------------------------------- LQ conditioning
@pytest.fixture(scope="module")
def flux_backbone():
    from pid_decoder.backbones import load_backbone

    from .test_backbones import tiny_kl

    return load_backbone("flux", module=tiny_kl("flux"))


def _hq(b: int = 2, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lq_conditioner_matches_the_recipe(flux_backbone, tiny_config):
    hq = _hq(4)
    cond = LQConditioner(flux_backbone, tiny_config, noise_prob=0.75, lq_dropout=0.3, caption_dropout=0.5)
    out = cond(hq, torch.Generator().manual_seed(11), ["a", "b", "c", "d"])
    # the same steps written out, from the same generator
    g = torch.Generator().manual_seed(11)
    lq = downsample_lq(hq)
    z = flux_backbone.encode(lq).to(torch.bfloat16).float()
    apply, sigma, eps = draw_latent_noise(z.shape, g, prob=0.75, sigma_max=0.8)
    z, degrade = latent_noise(z, apply=apply, sigma=sigma, eps=eps, frame="flow")
    cap_drop = torch.rand(4, generator=g) < 0.5
    lq_drop = torch.rand(4, generator=g) < 0.3
    z = z * (~lq_drop).view(4, 1, 1, 1)
    assert out.lq_image.shape == (4, 3, 16, 16) and out.lq_latent.shape == (4, 16, 2, 2)
    assert torch.equal(out.lq_image, lq) and torch.equal(out.lq_latent, z)
    assert torch.equal(out.degrade_sigma, degrade)  # dropped LQs keep their σ (parity Q8)
    assert torch.equal(out.lq_keep, ~lq_drop) and torch.equal(out.caption_drop, cap_drop)
    assert out.captions == ["" if d else c for c, d in zip("abcd", cap_drop.tolist())]


def test_lq_conditioner_switches(flux_backbone):
    hq = _hq(2)
    clean = LQConditioner(flux_backbone, noise_prob=0.0, lq_dropout=0.0, caption_dropout=0.0)(hq, None)
    assert torch.equal(clean.degrade_sigma, torch.zeros(2)) and clean.lq_keep.all() and clean.captions is None
    assert torch.equal(clean.lq_latent, flux_backbone.encode(downsample_lq(hq)).to(torch.bfloat16).float())
    dropped = LQConditioner(flux_backbone, lq_dropout=1.0)(hq, torch.Generator().manual_seed(0))
    assert not dropped.lq_latent.any() and not dropped.lq_keep.any()


def test_lq_conditioner_checks_the_network_and_sizes(flux_backbone, tiny_config):
    import dataclasses

    from pid_decoder.backbones import load_backbone

    from .test_backbones import tiny_kl

    sdxl = load_backbone("sdxl", module=tiny_kl("sdxl"))
    with pytest.raises(ValueError, match="4-channel latents at 1/8.*expects 16 channels"):
        LQConditioner(sdxl, tiny_config)
    wrong_sr = dataclasses.replace(tiny_config, lq=dataclasses.replace(tiny_config.lq, sr_scale=8))
    with pytest.raises(ValueError, match="sr_scale=4"):
        LQConditioner(flux_backbone, wrong_sr)
    with pytest.raises(ValueError, match="multiple of 64"):
        LQConditioner(flux_backbone)(_hq(1, 48), None)


class _PlainEncoder(torch.nn.Module):
    """A user's own latent model: encode() returns the latent mean as a tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)

    def encode(self, x):
        return self.conv(x)


def test_lq_conditioner_with_a_plain_user_module():
    module = _PlainEncoder()
    enc = LatentEncoder(module, latent_channels=4, down_factor=8, scaling_factor=0.5, shift_factor=0.1,
                        noise_frame="sdxl")
    hq = _hq(3)
    out = LQConditioner(enc, noise_prob=1.0, lq_dropout=0.0)(hq, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    z = (0.5 * (module.encode(downsample_lq(hq)) - 0.1)).detach().to(torch.bfloat16).float()
    apply, sigma, eps = draw_latent_noise(z.shape, g, prob=1.0)
    s = sigma.view(3, 1, 1, 1)
    assert apply.all() and torch.allclose(out.lq_latent, torch.sqrt(1 - s * s) * z + s * eps, atol=1e-6)
    with pytest.raises(ValueError, match="latent_channels= and down_factor="):
        LatentEncoder(module, scaling_factor=1.0)


def test_lq_conditioner_wraps_a_diffusers_vae(tiny_config):
    from pid_decoder.backbones import load_backbone

    from .test_backbones import tiny_kl

    vae = tiny_kl("sdxl")
    cond = LQConditioner(vae, noise_frame="sdxl")  # channels, down factor and scaling from vae.config
    assert (cond.backbone.latent_channels, cond.backbone.down_factor, cond.frame) == (4, 8, "vp")
    lq = downsample_lq(_hq(1))
    assert torch.allclose(cond.backbone.encode(lq), load_backbone("sdxl", module=vae).encode(lq), atol=1e-6)
    from .test_backbones import tiny_flux2

    with pytest.raises(TypeError, match="load_backbone\\('flux2', module=vae\\)"):
        LQConditioner(tiny_flux2())


# --------------------------------------------------------------------------- text-embedding pre-pass
@pytest.fixture(scope="module")
def tiny_text_encoder():
    pytest.importorskip("transformers")
    from transformers import Gemma2Model

    from pid_decoder.text import TextEncoder

    from .test_text import _gemma_config, _word_level_tokenizer

    tokenizer = _word_level_tokenizer()
    torch.manual_seed(0)
    decoder = Gemma2Model(_gemma_config(len(tokenizer))).eval()
    return TextEncoder("tiny-gemma", tokenizer=tokenizer, decoder=decoder, cache_dir=False, dtype=torch.float32)


def test_embed_dataset_prepass_and_loader(tmp_path, tiny_text_encoder):
    from pid_decoder.training.embed_dataset import embed_dataset

    enc = tiny_text_encoder
    root = _folder(tmp_path / "ds")
    _save(root / "d.png", 32, 32, 6)  # a second square image, so "a" has a bucket-mate to be replaced by
    (root / "d.txt").write_text("caption d")
    report = embed_dataset(root, encoder=enc, batch_size=4)
    out = root / ".text_embeddings"
    # empty + a + b + c (two variants) + d + small (too small for TINY; embedding is table-independent)
    assert (report.written, report.existing, report.out) == (7, 0, out)
    assert (out / "samples" / "sub" / "c.prompt_short.safetensors").is_file()
    again = embed_dataset(root, encoder=enc)
    assert (again.written, again.existing) == (0, 7)  # resumable: nothing redone

    loader = build_loader(root, buckets=TINY, num_workers=0, shuffle=False)  # embeddings found automatically
    assert torch.allclose(loader.empty_text, enc.encode("")[0])
    for _, batch in zip(range(len(loader)), loader):
        assert batch["text"].shape == (1, 300, 32) and batch["text"].dtype == torch.float32
        assert torch.allclose(batch["text"][0], enc.encode(batch["caption"][0])[0])

    (root / "a.txt").write_text("a changed caption")  # stale embedding: replaced and counted, never fatal
    stale = build_loader(root, buckets=TINY, num_workers=0, shuffle=False)
    assert "a" not in [b["key"][0] for _, b in zip(range(len(stale)), stale)]
    assert stale.counters["embedding_mismatch"] == 1
    assert embed_dataset(root, encoder=enc).written == 1  # the rerun redoes only that caption

    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="did not finish"):
        build_loader(root, buckets=TINY, num_workers=0)
    assert build_loader(root, buckets=TINY, num_workers=0, embeddings=None).empty_text is None


def test_embed_dataset_cli(tmp_path, capsys):
    from transformers import Gemma2ForCausalLM

    from pid_decoder import cli

    from .test_text import _gemma_config, _word_level_tokenizer

    folder = tmp_path / "gemma"
    tokenizer = _word_level_tokenizer()
    torch.manual_seed(0)
    Gemma2ForCausalLM(_gemma_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    root = tmp_path / "ds"
    _save(root / "x.png", 32, 32)
    (root / "x.txt").write_text("a red cat")
    out = tmp_path / "emb"
    code = cli.main(["embed", "--dataset", str(root), "--out", str(out), "--text-encoder", str(folder), "-q"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    assert (out / "samples" / "x.safetensors").is_file() and (out / "empty.safetensors").is_file()
    with pytest.raises(SystemExit) as exc:
        cli.main(["embed", "a prompt", "--dataset", str(root)])
    assert exc.value.code == 2
