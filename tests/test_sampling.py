"""Sampler schedules, noise handling and the chunked pixel pathway."""

from __future__ import annotations

import math

import pytest
import torch

from pid_decoder import sample, sample_teacher
from pid_decoder.sampling import dynamic_shift, student_t_list, teacher_time_grid

F32 = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, [1.0, 0.0]),
        (2, [0.999, 0.634, 0.0]),
        (3, [0.999, 0.866, 0.342, 0.0]),
        (4, [0.999, 0.866, 0.634, 0.342, 0.0]),
        (5, [0.999, 0.866, 0.634, 0.634, 0.342, 0.0]),
        (6, [0.999, 0.866, 0.866, 0.634, 0.342, 0.342, 0.0]),
    ],
)
def test_student_t_list(steps, expected):
    assert torch.equal(student_t_list(steps), F32(expected))


def test_student_t_values_scale_to_integers():
    assert (student_t_list(4)[:-1] * 1000).tolist() == [999.0, 866.0, 634.0, 342.0]


def test_dynamic_shift():
    assert dynamic_shift(2048, 2048) == pytest.approx(6.0)
    assert dynamic_shift(4096, 4096) == pytest.approx(6.0 * math.sqrt(2))
    assert dynamic_shift(64, 64) == pytest.approx(1.0606601717798214)


def test_teacher_grid_runs_from_below_one_to_zero():
    grid = teacher_time_grid(25, 6.0)
    assert grid.dtype == torch.float32 and len(grid) == 26
    assert grid[-1] == 0 and 0.9998 < grid[0] < 1
    assert bool((grid[1:] < grid[:-1]).all())


def _inputs(batch=1, h=2, w=3, sigma=0.2):
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, 16, h, w, generator=g),
        torch.randn(batch, 5, 24, generator=g),
        sigma,
    )


def test_same_seed_same_image_and_explicit_noise(tiny_net):
    lq, text, sigma = _inputs()
    H, W = 64, 96
    a = sample(tiny_net, lq, text, sigma, height=H, width=W, generator=torch.Generator().manual_seed(3))
    b = sample(tiny_net, lq, text, sigma, height=H, width=W, generator=torch.Generator().manual_seed(3))
    c = sample(tiny_net, lq, text, sigma, height=H, width=W, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(1, 3, H, W, generator=g) for _ in range(4)]
    d = sample(tiny_net, lq, text, sigma, height=H, width=W, noise=draws[0], step_noise=draws[1:])
    assert torch.equal(a, d)
    assert a.shape == (1, 3, H, W) and a.abs().max() <= 1


def test_ode_mode_draws_no_step_noise(tiny_net):
    lq, text, sigma = _inputs()
    noise = torch.randn(1, 3, 64, 96)
    a = sample(tiny_net, lq, text, sigma, height=64, width=96, mode="ode", noise=noise, generator=torch.Generator())
    b = sample(tiny_net, lq, text, sigma, height=64, width=96, mode="ode", noise=noise, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)


def test_callback_reports_each_step(tiny_net):
    lq, text, sigma = _inputs()
    seen = []
    sample(tiny_net, lq, text, sigma, height=64, width=96, steps=3, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_chunked_pixel_pathway_matches_unchunked(tiny_net):
    lq, text, sigma = _inputs(batch=2)
    x = torch.randn(2, 3, 64, 96)
    t = torch.tensor([999.0, 500.0])
    cond = tiny_net.prepare(text, lq, sigma, 64, 96)
    with torch.inference_mode():
        full = tiny_net.denoise(x, t, cond)
        for chunk in (1, 5, 7, 24):
            torch.testing.assert_close(tiny_net.denoise(x, t, cond, chunk=chunk), full, rtol=1e-5, atol=1e-5)


def test_batch_items_are_independent(tiny_net):
    lq, text, _ = _inputs(batch=2)
    sigma = torch.tensor([0.0, 0.5])
    noise = torch.randn(2, 3, 64, 96)
    both = sample(tiny_net, lq, text, sigma, height=64, width=96, mode="ode", noise=noise)
    one = sample(tiny_net, lq[1:], text[1:], sigma[1:], height=64, width=96, mode="ode", noise=noise[1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)


def test_teacher_guidance_scale_one_ignores_negative(tiny_net):
    lq, text, sigma = _inputs()
    noise = torch.randn(1, 3, 64, 96)
    a = sample_teacher(tiny_net, lq, text, sigma, height=64, width=96, steps=3, cfg_scale=1.0, noise=noise)
    b = sample_teacher(
        tiny_net, lq, text, sigma, negative_text=torch.randn(1, 4, 24), height=64, width=96, steps=3, cfg_scale=1.0,
        noise=noise,
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="negative_text"):
        sample_teacher(tiny_net, lq, text, sigma, height=64, width=96, steps=3, cfg_scale=5.0, noise=noise)


def test_student_rejects_pixeldit(tiny_config):
    import dataclasses

    from pid_decoder import PiDNet

    net = PiDNet(dataclasses.replace(tiny_config, lq=None))
    with pytest.raises(ValueError, match="sample_teacher"):
        sample(net, None, torch.randn(1, 4, 24), None, height=32, width=32)


def test_full_window_equals_plain_decode(tiny_net):
    from pid_decoder.model.net import Window

    lq, text, sigma = _inputs()
    x = torch.randn(1, 3, 64, 96)
    t = torch.tensor([700.0])
    with torch.inference_mode():
        plain = tiny_net.denoise(x, t, tiny_net.prepare(text, lq, sigma, 64, 96))
        windowed = tiny_net.denoise(x, t, tiny_net.prepare(text, lq, sigma, 64, 96, window=Window(0, 0, 64, 96)))
        assert torch.equal(plain, windowed)
        part = tiny_net.prepare(text, lq, sigma, 32, 48, window=Window(16, 32, 64, 96))
        assert part.rope_patch.shape[0] == 2 * 3 and part.lq_feats[0].shape[1] == 6
        assert tiny_net.denoise(x[..., 16:48, 32:80], t, part).shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="does not fit"):
        tiny_net.prepare(text, lq, sigma, 64, 64, window=Window(16, 48, 64, 96))


def test_memory_budget_picks_a_chunk_and_keeps_the_image(tiny_net):
    from pid_decoder.model.memory import choose_chunk, parse_memory, pixel_bytes_per_token

    assert parse_memory("4GB") == 4 * 2**30 and parse_memory("512 MiB") == 512 * 2**20 and parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory("lots")
    cfg = tiny_net.config
    per = pixel_bytes_per_token(cfg, torch.float32)
    cpu = torch.device("cpu")
    assert choose_chunk(cfg, 24, cpu, torch.float32, max_memory=10**9) is None  # everything fits
    small = choose_chunk(cfg, 24, cpu, torch.float32, max_memory=24 * 200 + 5 * per)
    assert small is not None and 1 <= small < 24
    lq, text, sigma = _inputs()
    noise = torch.randn(1, 3, 64, 96)
    full = sample(tiny_net, lq, text, sigma, height=64, width=96, mode="ode", noise=noise, chunk=10**6)
    tight = sample(tiny_net, lq, text, sigma, height=64, width=96, mode="ode", noise=noise, max_memory=24 * 200 + 5 * per)
    torch.testing.assert_close(tight, full, rtol=1e-5, atol=1e-5)


def test_prepare_windows_shares_the_lq_trunk_and_matches_single_windows(tiny_net, monkeypatch):
    from pid_decoder.model.net import Crop, Window

    lq, text, sigma = _inputs()
    calls = []
    trunk = tiny_net.lq_proj.trunk
    monkeypatch.setattr(tiny_net.lq_proj, "trunk", lambda *a: calls.append(1) or trunk(*a))
    crops = [Crop(0, 0, 32, 48), Crop(32, 48, 32, 48), Crop(16, 16, 48, 64)]
    many = tiny_net.prepare_windows(text, lq, sigma, 64, 96, crops)
    assert len(calls) == 1
    for crop, cond in zip(crops, many):
        one = tiny_net.prepare(text, lq, sigma, crop.height, crop.width, window=Window(crop.top, crop.left, 64, 96))
        for a, b in zip(cond.lq_feats + [cond.pit_feat, *cond.rope_patch, *cond.pixel_pos],
                        one.lq_feats + [one.pit_feat, *one.rope_patch, *one.pixel_pos]):
            assert torch.equal(a, b)


def test_x0_update_in_slices_is_bitwise_the_float64_formula(monkeypatch):
    import pid_decoder.sampling as sampling

    monkeypatch.setattr(sampling, "_X0_BLOCK", 1000)
    x, v = torch.randn(2, 3, 40, 56), torch.randn(2, 3, 40, 56)
    t = torch.tensor(0.866)
    expected = (x.double() - t.double() * v.double()).float()
    assert torch.equal(sampling._x0_from_velocity(x, t, v), expected)
    assert torch.equal(sampling._x0_from_velocity(x.transpose(2, 3), t, v.transpose(2, 3)), expected.transpose(2, 3))
