"""The attention kernel choice: validated names, CPU untouched, same results whatever the choice."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pid_decoder import PiDNet, set_attention_backend
from pid_decoder.model.attention import ATTENTION_BACKENDS, attention_kernels


def test_unknown_backend_is_an_error_that_lists_the_choices():
    with pytest.raises(ValueError, match="auto, torch, cudnn, efficient, flash, math"):
        set_attention_backend("fastest")


def test_cpu_attention_is_not_redirected():
    assert isinstance(attention_kernels(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_every_backend_choice_gives_the_same_cpu_result(tiny_config, backend):
    torch.manual_seed(0)
    net = PiDNet(tiny_config).eval()
    lq, text, x = torch.randn(1, 16, 2, 3), torch.randn(1, 5, 24), torch.randn(1, 3, 64, 96)
    t = torch.tensor([500.0])
    with torch.inference_mode():
        cond = net.prepare(text, lq, 0.1, 64, 96)
        ref = net.denoise(x, t, cond)
        try:
            set_attention_backend(backend)
            out = net.denoise(x, t, cond)
        finally:
            set_attention_backend("auto")
    assert torch.equal(out, ref)
