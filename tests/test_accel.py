"""Optional accelerations give the same image: compile, CUDA graphs (GPU only), sequential offload."""

from __future__ import annotations

import pytest
import torch

from pid_decoder import PiDNet, sample
from pid_decoder.accel import compile_network, enable_sequential_offload, sample_cuda_graph

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(seed=7, h=2, w=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, h, w, generator=g).to(device), torch.randn(1, 5, 24, generator=g).to(device), 0.2


def _fresh_net(config, device="cpu"):
    """A private copy of the tiny net (these tests modify the network in place)."""
    torch.manual_seed(1234)
    return PiDNet(config).eval().requires_grad_(False).to(device)


# ------------------------------------------------------------------------------------------- compile
def _check_compiled_denoise_matches_eager(config, **compile_kwargs):
    eager = _fresh_net(config)
    compiled = compile_network(_fresh_net(config), **compile_kwargs)
    lq, text, sigma = _inputs()
    with torch.inference_mode():
        cond = eager.prepare(text, lq, sigma, 64, 96)
        x = torch.randn(1, 3, 64, 96)
        t = torch.tensor([866.0])
        for chunk in (None, 5):  # chunk 5 of 24 tokens: a ragged last chunk
            torch.testing.assert_close(
                compiled.denoise(x, t, cond, chunk=chunk), eager.denoise(x, t, cond, chunk=chunk), rtol=1e-4, atol=1e-4
            )
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    # a whole decode through the compiled blocks (the compiled graphs are reused for both steps)
    kw = {"height": 64, "width": 96, "steps": 2}
    ref = sample(eager, lq, text, sigma, generator=torch.Generator().manual_seed(3), **kw)
    out = sample(compiled, lq, text, sigma, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_match_eager_graph_capture(tiny_config):
    """Dynamo capture + AOT functionalisation (the in-place chunk updates) without code generation: fast."""
    _check_compiled_denoise_matches_eager(tiny_config, backend="aot_eager")


@pytest.mark.slow
def test_compiled_blocks_match_eager_inductor(tiny_config):
    """The default inductor backend (generates and builds C++ kernels: about a minute on 2 cores)."""
    _check_compiled_denoise_matches_eager(tiny_config)


# ------------------------------------------------------------------------------------------- offload
def test_sequential_offload_gives_the_same_image_and_moves_every_block(tiny_config):
    plain = _fresh_net(tiny_config)
    net = _fresh_net(tiny_config)
    offload = enable_sequential_offload(net, "cpu")
    blocks = [*net.patch_blocks, *net.pixel_blocks]
    stored = {b: [s for *_, s in offload._stored[b]] for b in blocks}
    seen = []

    def check_loaded(block, args):  # registered after the offload's hook, so it sees the loaded block
        assert block in offload.loaded and len(offload.loaded) == 1  # one block on the device at a time
        seen.append(block)

    checks = [b.register_forward_pre_hook(check_loaded) for b in blocks]
    lq, text, sigma = _inputs()
    kw = {"height": 64, "width": 96, "steps": 4, "chunk": 7}
    ref = sample(plain, lq, text, sigma, generator=torch.Generator().manual_seed(3), **kw)
    out = sample(net, lq, text, sigma, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(out, ref)
    n = len(blocks) * 4
    assert offload.loads == offload.unloads == n and len(seen) == n and not offload.loaded
    # between calls, every block parameter is its stored CPU copy again
    for b in blocks:
        params = [p for m in b.modules() for p in m._parameters.values() if p is not None]
        assert [p.data_ptr() for p in params] == [s.data_ptr() for s in stored[b]]
    offload.remove()
    for handle in checks:
        handle.remove()
    sample(net, lq, text, sigma, generator=torch.Generator().manual_seed(3), **kw)
    assert offload.loads == n  # hooks removed


def test_sequential_offload_keeps_the_rest_on_the_device(tiny_config):
    net = _fresh_net(tiny_config)
    enable_sequential_offload(net, "cpu")
    assert net.device == torch.device("cpu")
    assert net.y_pos_embedding.device == torch.device("cpu")


# --------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@gpu
def test_cuda_graph_sample_matches_sample(tiny_config):
    net = _fresh_net(tiny_config, "cuda")
    graphs = {}
    for seed in (7, 8):  # the second image reuses the captured graph with new conditioning
        lq, text, sigma = _inputs(seed, device="cuda")
        for mode in ("sde", "ode"):
            ref = sample(net, lq, text, sigma, height=64, width=96, mode=mode,
                         generator=torch.Generator().manual_seed(seed))
            out = sample_cuda_graph(net, lq, text, sigma, height=64, width=96, mode=mode, chunk=None,
                                    generator=torch.Generator().manual_seed(seed), graphs=graphs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1


@pytest.mark.gpu
@gpu
def test_cuda_graph_with_chunk_and_new_size(tiny_config):
    net = _fresh_net(tiny_config, "cuda")
    graphs = {}
    for h, w in ((2, 3), (3, 2)):
        lq, text, sigma = _inputs(h=h, w=w, device="cuda")
        kw = {"height": 32 * h, "width": 32 * w, "chunk": 5}
        ref = sample(net, lq, text, sigma, generator=torch.Generator().manual_seed(1), **kw)
        out = sample_cuda_graph(net, lq, text, sigma, generator=torch.Generator().manual_seed(1), graphs=graphs, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2


@pytest.mark.gpu
@gpu
def test_sequential_offload_to_cuda_matches_the_gpu_net(tiny_config):
    plain = _fresh_net(tiny_config, "cuda")
    net = _fresh_net(tiny_config, "cpu")
    offload = enable_sequential_offload(net, "cuda")
    assert net.device.type == "cuda"
    assert all(p.device.type == "cpu" and p.is_pinned() for b in net.patch_blocks for p in b.parameters())
    lq, text, sigma = _inputs(device="cuda")
    ref = sample(plain, lq, text, sigma, height=64, width=96, generator=torch.Generator().manual_seed(3))
    out = sample(net, lq, text, sigma, height=64, width=96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert offload.loads == 4 * (len(net.patch_blocks) + len(net.pixel_blocks)) and not offload.loaded
    assert all(p.device.type == "cpu" for b in net.pixel_blocks for p in b.parameters())


@pytest.mark.gpu
@gpu
def test_compiled_blocks_match_eager_on_cuda(tiny_config):
    eager = _fresh_net(tiny_config, "cuda")
    compiled = compile_network(_fresh_net(tiny_config, "cuda"))
    lq, text, sigma = _inputs(device="cuda")
    ref = sample(eager, lq, text, sigma, height=64, width=96, generator=torch.Generator().manual_seed(3))
    out = sample(compiled, lq, text, sigma, height=64, width=96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
