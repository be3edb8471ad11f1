"""CUDA behaviour: golden conformance on the GPU, chunking exactness, a step loop without host syncs.

All tests here need a CUDA device and are skipped elsewhere (CI is CPU-only); `bench/gpu_check.sh` runs them
on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from pid_decoder import PiDNet, load_network, sample
from pid_decoder.config import NetConfig
from pid_decoder.sampling import student_loop

from .conftest import golden_cases, load_case, rel_l2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PID_CASES = [name for name in golden_cases() if load_case(name)["config"]["kind"] == "pid"]


def _case_net(name, dtype):
    case = load_case(name)
    config = NetConfig.from_reference(case["config"]["net"])
    net = load_network(case["folder"] / "model_ema_bf16.pth", config, dtype=dtype, device="cuda")
    return case, net


def _cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items() if torch.is_tensor(v)}


@pytest.fixture
def strict_fp32():
    """float32 means float32: no TF32 in cuBLAS / cuDNN (convolutions default to TF32 on Ampere+)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", PID_CASES)
def test_golden_forward_and_student_on_cuda_fp32(name, strict_fp32):
    case, net = _case_net(name, torch.float32)
    inp = _cuda(case["inputs"])
    out = net(inp["x_t"], inp["t_scaled"], inp["y"], inp["lq_latent"], inp["degrade_sigma"])
    assert rel_l2(out.cpu(), case["expected"]["forward"]) <= 1e-5
    H, W = inp["x_t"].shape[-2:]
    img = sample(net, inp["lq_latent"], inp["y"], inp["degrade_sigma"], height=H, width=W, noise=inp["noise"],
                 step_noise=list(inp["sde_eps"]))
    assert rel_l2(img.cpu(), case["expected"]["sample"]) <= 1e-5


@pytest.mark.parametrize("name", PID_CASES)
def test_golden_forward_on_cuda_bf16(name):
    case, net = _case_net(name, torch.bfloat16)
    inp = _cuda(case["inputs"])
    out = net(inp["x_t"], inp["t_scaled"], inp["y"], inp["lq_latent"], inp["degrade_sigma"])
    assert out.dtype == torch.float32
    assert rel_l2(out.cpu(), case["expected"]["forward"]) <= 5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_on_cuda(tiny_config, dtype, strict_fp32):
    torch.manual_seed(0)
    net = PiDNet(tiny_config).to("cuda", dtype).eval()
    g = torch.Generator("cuda").manual_seed(3)
    lq = torch.randn(2, 16, 4, 6, generator=g, device="cuda")
    text = torch.randn(2, 5, 24, generator=g, device="cuda")
    kw = {"height": 128, "width": 192, "steps": 4}
    ref = sample(net, lq, text, 0.1, generator=torch.Generator("cuda").manual_seed(1), chunk=None, **kw)
    for chunk in (1, 7, 40):
        out = sample(net, lq, text, 0.1, generator=torch.Generator("cuda").manual_seed(1), chunk=chunk, **kw)
        # float rounding only: GEMMs of other shapes sum in another order
        assert rel_l2(out.cpu(), ref.cpu()) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_step_loop_never_waits_for_the_device(tiny_config):
    """With a CUDA generator, the 4 steps (network, x0 update, re-noising) make no synchronising call."""
    torch.manual_seed(0)
    net = PiDNet(tiny_config).to("cuda", torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(3)
    lq = torch.randn(1, 16, 4, 6, generator=g, device="cuda")
    text = torch.randn(1, 5, 24, generator=g, device="cuda")
    with torch.inference_mode():
        cond = net.prepare(text, lq, 0.2, 128, 192)
        x = torch.randn(1, 3, 128, 192, generator=g, device="cuda")
        student_loop(lambda x, t: net.denoise(x, t, cond, chunk=5), x.clone(), 4, generator=g)  # warm caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = student_loop(lambda x, t: net.denoise(x, t, cond, chunk=5), x, 4, generator=g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (1, 3, 128, 192) and bool(torch.isfinite(out).all())


def test_automatic_chunk_bounds_4k_memory_on_cuda():
    """The automatic chunk never exceeds CUDA_CHUNK, whatever the free memory."""
    from pid_decoder.model.memory import CUDA_CHUNK, choose_chunk
    from pid_decoder.presets import resolve_preset

    cfg = resolve_preset("flux-4k").net
    tokens = (4096 // 16) ** 2
    chunk = choose_chunk(cfg, tokens, torch.device("cuda"), torch.bfloat16)
    assert chunk is not None and chunk <= CUDA_CHUNK
    assert choose_chunk(cfg, tokens, torch.device("cuda"), torch.bfloat16, max_memory="1TB") == CUDA_CHUNK


@pytest.mark.parametrize("backend", ["auto", "cudnn", "flash", "efficient", "torch"])
def test_attention_backends_agree_on_cuda(tiny_config, backend):
    from pid_decoder import set_attention_backend

    torch.manual_seed(0)
    net = PiDNet(tiny_config).to("cuda", torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(3)
    lq = torch.randn(1, 16, 4, 6, generator=g, device="cuda")
    text = torch.randn(1, 5, 24, generator=g, device="cuda")
    x = torch.randn(1, 3, 128, 192, generator=g, device="cuda")
    t = torch.full((1,), 700.0, device="cuda")
    with torch.inference_mode():
        cond = net.prepare(text, lq, 0.2, 128, 192)
        try:
            set_attention_backend("math")
            ref = net.denoise(x, t, cond)
            set_attention_backend(backend)
            out = net.denoise(x, t, cond)
        finally:
            set_attention_backend("auto")
    assert rel_l2(out.cpu(), ref.cpu()) <= 2e-2


def test_pipeline_on_cuda_draws_from_a_cuda_generator_as_the_reference(tiny_config):
    import numpy as np

    from pid_decoder import PiDPipeline
    from pid_decoder.backbones import tensor_to_image

    torch.manual_seed(0)
    net = PiDNet(tiny_config).to("cuda").eval()
    pipe = PiDPipeline(net, backbone_name="flux")
    assert pipe.noise_device.type == "cuda"
    latent = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
    image = pipe.decode(latent, text_embedding=emb, seed=7)[0]
    # parity: the reference hands PiD the latent rounded to bf16
    out = sample(net, latent.to(torch.bfloat16).float().cuda(), emb[None].cuda(), 0.0, height=64, width=96,
                 generator=torch.Generator("cuda").manual_seed(7))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(tensor_to_image(out)))
