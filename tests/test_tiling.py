"""Tiled (MultiDiffusion-style) decode: the tile plan, the blend weights, exactness with one tile."""

from __future__ import annotations

import itertools

import pytest
import torch

from pid_decoder import sample
from pid_decoder.tiling import Tile, blend_weights, plan_tiles, sample_tiled

from .conftest import rel_l2


def _inputs(h=2, w=3):
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 16, h, w, generator=g), torch.randn(1, 5, 24, generator=g), 0.2


def _coverage(tiles, height, width):
    count = torch.zeros(height, width, dtype=torch.int32)
    for t in tiles:
        count[t.slices] += 1
    return count


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(64, 96, (32, 48), 16), (512, 512, 256, 64), (208, 400, 128, 32), (64, 64, 128, 16), (96, 160, 48, 0)],
)
def test_plan_tiles_covers_image_on_the_patch_grid(height, width, tile, overlap):
    tiles = plan_tiles(height, width, tile, overlap)
    assert bool((_coverage(tiles, height, width) >= 1).all())
    for t in tiles:
        assert t.top % 16 == 0 and t.left % 16 == 0 and t.height % 16 == 0 and t.width % 16 == 0
        assert 0 <= t.top and t.top + t.height <= height and 0 <= t.left and t.left + t.width <= width
    # edge tiles are flush with the border
    assert max(t.top + t.height for t in tiles) == height and max(t.left + t.width for t in tiles) == width


def test_plan_tiles_neighbours_overlap_by_at_least_the_request():
    tiles = plan_tiles(208, 400, 128, 32)
    tops = sorted({t.top for t in tiles})
    lefts = sorted({t.left for t in tiles})
    assert tops == [0, 80] and lefts == [0, 96, 192, 272]  # stride 96; last column moved back flush
    for starts in (tops, lefts):
        assert all(128 - (b - a) >= 32 for a, b in itertools.pairwise(starts))
    assert len(tiles) == len(tops) * len(lefts)


def test_plan_tiles_edge_cases():
    assert plan_tiles(64, 96, 256, 16) == [Tile(0, 0, 64, 96)]  # tile larger than the image: one tile
    assert plan_tiles(64, 96, (64, 96), 16) == [Tile(0, 0, 64, 96)]
    assert [t.left for t in plan_tiles(16, 64, 16, 0)] == [0, 16, 32, 48]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 64, "width": 96, "tile": 40, "overlap": 16}, "multiple of 16"),
        ({"height": 64, "width": 90, "tile": 32, "overlap": 16}, "multiple of 16"),
        ({"height": 64, "width": 96, "tile": 32, "overlap": 24}, "overlap 24"),
        ({"height": 64, "width": 96, "tile": 32, "overlap": -1}, "overlap -1"),
        ({"height": 64, "width": 96, "tile": (32, 48, 16), "overlap": 8}, "pair"),
    ],
)
def test_plan_tiles_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_tiles(**kwargs)


def test_blend_weights_sum_to_one_and_are_one_where_a_single_tile_covers():
    tiles = plan_tiles(64, 96, (32, 48), 16)
    weights = blend_weights(tiles, 64, 96, (16, 16), torch.device("cpu"))
    total = torch.zeros(64, 96)
    for t, w in zip(tiles, weights):
        assert w.shape == (t.height, t.width) and bool((w > 0).all())
        total[t.slices] += w
    torch.testing.assert_close(total, torch.ones(64, 96), rtol=0, atol=1e-6)
    assert bool((weights[0][:16, :32] == 1).all())  # the top-left corner is covered by the first tile only


def test_one_tile_equals_sample_exactly(tiny_net):
    lq, text, sigma = _inputs()
    for mode in ("sde", "ode"):
        ref = sample(tiny_net, lq, text, sigma, height=64, width=96, mode=mode,
                     generator=torch.Generator().manual_seed(3))
        out = sample_tiled(tiny_net, lq, text, sigma, height=64, width=96, tile=(64, 96), overlap=16, mode=mode,
                           generator=torch.Generator().manual_seed(3))
        assert torch.equal(out, ref), mode


def test_tiled_decode_is_close_to_the_exact_decode(tiny_net):
    lq, text, sigma = _inputs()
    steps = []
    ref = sample(tiny_net, lq, text, sigma, height=64, width=96, generator=torch.Generator().manual_seed(3))
    out = sample_tiled(tiny_net, lq, text, sigma, height=64, width=96, tile=(32, 48), overlap=16,
                       generator=torch.Generator().manual_seed(3), chunk=2, callback=lambda i, n: steps.append(i))
    assert out.shape == (1, 3, 64, 96) and bool(torch.isfinite(out).all())
    assert steps == [1, 2, 3, 4]
    err = rel_l2(out, ref)
    assert 0 < err < 0.5, err  # approximate (windowed attention), but the same image


def test_tiled_rejects_pixeldit_and_bad_mode(tiny_net, tiny_config):
    import dataclasses

    from pid_decoder import PiDNet

    lq, text, sigma = _inputs()
    with pytest.raises(ValueError, match="mode"):
        sample_tiled(tiny_net, lq, text, sigma, height=64, width=96, tile=32, mode="euler")
    pixeldit = PiDNet(dataclasses.replace(tiny_config, lq=None))
    with pytest.raises(ValueError, match="PixelDiT"):
        sample_tiled(pixeldit, None, text, None, height=64, width=96, tile=32)


def test_lazy_lq_windows_give_the_same_velocity_and_hold_no_features(tiny_net):
    """Tiled decode keeps the LQ trunk output once and runs the per-token heads per window and step."""
    from pid_decoder.model.net import Crop

    lq, text, sigma = _inputs()
    crops = [Crop(0, 0, 32, 48), Crop(32, 48, 32, 48), None]
    with torch.inference_mode():
        eager = tiny_net.prepare_windows(text, lq, sigma, 64, 96, crops)
        lazy = tiny_net.prepare_windows(text, lq, sigma, 64, 96, crops, lazy_lq=True)
        for e, z in zip(eager, lazy):
            assert z.lq_feats is None and z.pit_feat is None and z.lq_source is not None
            x = torch.randn(1, 3, e.height, e.width, generator=torch.Generator().manual_seed(2))
            t = torch.tensor([600.0])
            assert torch.equal(tiny_net.denoise(x, t, z), tiny_net.denoise(x, t, e))
    # the windows share one trunk output
    assert lazy[0].lq_source[0] is lazy[1].lq_source[0]
