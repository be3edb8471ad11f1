"""Bad input raises ValueError before any compute, saying what was received and what is expected."""

from __future__ import annotations

import pytest
import torch

from pid_decoder import sample


@pytest.fixture
def guarded(tiny_net, monkeypatch):
    """The tiny net, with every compute entry point booby-trapped."""

    def boom(*args, **kwargs):
        raise AssertionError("compute started before validation")

    monkeypatch.setattr(tiny_net, "denoise", boom)
    monkeypatch.setattr(tiny_net.lq_proj, "forward", boom)
    monkeypatch.setattr(tiny_net.y_embedder.proj, "forward", boom)
    return tiny_net


def ok_inputs(batch=1):
    return torch.randn(batch, 16, 2, 3), torch.randn(batch, 5, 24), torch.full((batch,), 0.1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(lq=torch.randn(1, 4, 2, 3)), r"expects latents with 16 channels, got 4 .*sdxl-4k"),
        (dict(lq=torch.randn(1, 128, 2, 3)), r"got 128 .*flux2-2k"),
        (dict(height=60), r"multiples of 16"),
        (dict(height=128), r"does not match the latent grid 2x3.*must be 64x96"),
        (dict(text=torch.randn(2, 5, 24)), r"batch sizes disagree: lq_latent has 1 items, text has 2"),
        (dict(sigma=torch.tensor([0.1, 0.2])), r"degrade_sigma must be a float or a \(1,\) tensor"),
        (dict(lq=torch.full((1, 16, 2, 3), float("nan"))), r"lq_latent contains 96 NaN or infinite"),
        (dict(lq=torch.full((1, 16, 2, 3), float("inf"))), r"lq_latent contains"),
        (dict(sigma=1.5), r"degrade_sigma must be in \[0, 1\], got \[1.5\]"),
        (dict(sigma=-0.1), r"degrade_sigma must be in \[0, 1\]"),
        (dict(sigma=None), r"degrade_sigma is required"),
        (dict(lq=torch.randn(0, 16, 2, 3), text=torch.randn(0, 5, 24)), r"empty batch"),
        (dict(text=torch.randn(1, 5, 23)), r"text must have shape \(B, T>=1, 24\)"),
        (dict(lq=torch.randn(16, 2, 3)), r"lq_latent must be a 4-D tensor"),
        (dict(lq=None), r"lq_latent is required"),
    ],
)
def test_bad_input(guarded, change, message):
    lq, text, sigma = ok_inputs()
    args = dict(lq=lq, text=text, sigma=sigma, height=64, width=96)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        sample(guarded, args["lq"], args["text"], args["sigma"], height=args["height"], width=args["width"])


def test_bad_forward_arguments(guarded):
    lq, text, sigma = ok_inputs()
    with pytest.raises(ValueError, match=r"x must be a tensor \(B, 3, H, W\)"):
        guarded(torch.randn(1, 4, 64, 96), torch.tensor([500.0]), text, lq, sigma)
    with pytest.raises(ValueError, match="batch sizes disagree: x has 2 items"):
        guarded(torch.randn(2, 3, 64, 96), torch.tensor([500.0]), text, lq, sigma)
    with pytest.raises(ValueError, match="t must be a scalar or a"):
        guarded(torch.randn(1, 3, 64, 96), torch.ones(3), text, lq, sigma)


def test_bad_noise_shape(tiny_net):
    lq, text, sigma = ok_inputs()
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 3, 64, 96\)"):
        sample(tiny_net, lq, text, sigma, height=64, width=96, noise=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="mode must be"):
        sample(tiny_net, lq, text, sigma, height=64, width=96, mode="heun")
