"""Backbones on tiny random diffusers VAEs: normalisation, noise frames, weight files, packed latents, bad input.

Every model is built from a tiny config (4 blocks of 8-16 channels so the down factors are the real ones);
nothing is downloaded.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pid_decoder.backbones import (
    BACKBONES,
    add_noise,
    capture_sigma,
    check_latent,
    image_to_tensor,
    latents_from_pipeline,
    load_backbone,
    patchify_2x2,
    unpatchify_2x2,
)
from pid_decoder.backbones.packing import pack_2x2, pack_tokens, unpack_2x2

diffusers = pytest.importorskip("diffusers")

KL_TINY = dict(
    block_out_channels=[8, 8, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
)
KL_VARIANTS = {
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=None, use_quant_conv=True, use_post_quant_conv=True),
}
QWEN_TINY = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True])


def kl_config(name: str) -> dict:
    return {"_class_name": "AutoencoderKL", **KL_TINY, **KL_VARIANTS[name]}


def tiny_kl(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL.from_config(kl_config(name)).eval()


def flux2_config() -> dict:
    return {"_class_name": "AutoencoderKLFlux2", **KL_TINY, "latent_channels": 32}


def tiny_flux2(seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2.from_config(flux2_config()).eval()
    vae.bn.running_mean.normal_(0.0, 0.5)  # non-trivial statistics so the normalisation is visible
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def tiny_qwen(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLQwenImage(**QWEN_TINY).eval()


def images(b: int = 2, h: int = 32, w: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def to_ldm(state: dict, num_blocks: int = 4) -> dict:
    """diffusers AutoencoderKL names -> BFL/LDM names (backbones.md §8), written independently of the loader."""
    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.", k,
        )
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m.group(1))}.upsample.", k,
        )
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        k = k.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
        for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid.attn_1.{old}.")
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM attention projections are 1x1 convolutions
        out[k] = value.contiguous()
    return out


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------------------------------
# Names and import cost
# ------------------------------------------------------------------------------------------------


def test_backbone_names_match_presets():
    from pid_decoder.presets import PRESETS

    assert set(BACKBONES) == {p.backbone for p in PRESETS.values() if p.backbone}


def test_import_is_light():
    code = "import sys, pid_decoder.backbones; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "alias, canonical", [("zimage", "flux"), ("zimage-turbo", "flux"), ("flux2-klein-4b", "flux2"), ("FLUX2-klein-9b", "flux2")]
)
def test_aliases(alias, canonical):
    module = tiny_flux2() if canonical == "flux2" else tiny_kl("flux")
    assert load_backbone(alias, module=module).name == canonical


def test_qwenimage_2512_alias():
    assert load_backbone("qwenimage-2512", module=tiny_qwen()).name == "qwenimage"


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'flux3'.*flux2"):
        load_backbone("flux3", module=tiny_kl("flux"))


# ------------------------------------------------------------------------------------------------
# Normalisation against the spec formula on the raw diffusers output
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, scale, shift", [("flux", 0.3611, 0.1159), ("sd3", 1.5305, 0.0609), ("sdxl", 0.13025, 0.0)])
def test_kl_encode_decode(name, scale, shift):
    vae = tiny_kl(name)
    bb = load_backbone(name, module=vae)
    x = images()
    z = bb.encode(x)
    c = 4 if name == "sdxl" else 16
    assert (bb.latent_channels, bb.down_factor, bb.image_multiple) == (c, 8, 16)
    assert z.shape == (2, c, 4, 6) and z.dtype == torch.float32
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mode()
        expected = scale * (mu - shift)
        torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
        out = bb.decode(z)
        ref = vae.decode(z / scale + shift).sample.clamp(-1, 1)
    assert out.shape == (2, 3, 32, 48)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flux2_encode_decode():
    from diffusers import Flux2Pipeline

    vae = tiny_flux2()
    bb = load_backbone("flux2", module=vae)
    assert (bb.latent_channels, bb.down_factor) == (128, 16)
    x = images()
    z = bb.encode(x)
    assert z.shape == (2, 128, 2, 3)
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mode()  # raw (2, 32, 4, 6)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
        expected = (Flux2Pipeline._patchify_latents(mu) - mean) / std
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
        out = bb.decode(z)
        ref = vae.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample.clamp(-1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flux2_bn_eps_is_checked():
    vae = diffusers.AutoencoderKLFlux2.from_config({**flux2_config(), "batch_norm_eps": 1e-5})
    with pytest.raises(ValueError, match="batch_norm_eps must be 0.0001"):
        load_backbone("flux2", module=vae)


def test_qwenimage_encode_decode():
    from pid_decoder.backbones.qwenimage import LATENTS_MEAN, LATENTS_STD

    vae = tiny_qwen()
    bb = load_backbone("qwenimage", module=vae)
    x = images()
    z = bb.encode(x)
    assert z.shape == (2, 16, 4, 6)
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1)
    with torch.no_grad():
        mu = vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        torch.testing.assert_close(z, (mu - mean) / std, rtol=1e-5, atol=1e-6)
        out = bb.decode(z)
        ref = vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0]
    assert out.shape == (2, 3, 32, 48)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_module_keeps_its_dtype():
    vae = tiny_kl("flux").to(torch.bfloat16)
    bb = load_backbone("flux", module=vae)
    assert bb.dtype == torch.bfloat16 and next(vae.parameters()).dtype == torch.bfloat16
    assert bb.encode(images()).dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Patchify / packing
# ------------------------------------------------------------------------------------------------


def test_patchify_matches_diffusers_and_round_trips():
    from diffusers import Flux2Pipeline

    x = torch.randn(2, 32, 6, 8)
    p = patchify_2x2(x)
    torch.testing.assert_close(p, Flux2Pipeline._patchify_latents(x), rtol=0, atol=0)
    # channel c·4 + 2·py + px at (i, j) holds x[c, 2i + py, 2j + px]
    assert p[1, 3 * 4 + 2 * 1 + 0, 2, 1] == x[1, 3, 5, 2]
    torch.testing.assert_close(unpatchify_2x2(p), x, rtol=0, atol=0)


def test_pack_2x2_matches_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 8)
    packed = FluxPipeline._pack_latents(x, 2, 16, 6, 8)
    torch.testing.assert_close(pack_2x2(x), packed, rtol=0, atol=0)
    torch.testing.assert_close(unpack_2x2(packed, 6, 8), x, rtol=0, atol=0)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 64, 8), x, rtol=0, atol=0)


def test_patchify_odd_grid_refused():
    with pytest.raises(ValueError, match="even latent grid, got 5x8"):
        patchify_2x2(torch.randn(1, 32, 5, 8))


# ------------------------------------------------------------------------------------------------
# Noise frames
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_add_noise_frames(name):
    bb = load_backbone(name, module=tiny_kl(name))
    z = torch.randn(1, bb.latent_channels, 4, 6)
    sigma = 0.3
    noisy = bb.add_noise(z, sigma, torch.Generator().manual_seed(5))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    keep = math.sqrt(1 - sigma**2) if name == "sdxl" else 1 - sigma
    torch.testing.assert_close(noisy, keep * z + sigma * eps, rtol=1e-6, atol=1e-6)


def test_add_noise_sigma_zero_draws_nothing():
    z = torch.randn(1, 16, 4, 4)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert add_noise(z, 0.0, g) is z
    assert torch.equal(g.get_state(), state)


def test_add_noise_sigma_one_vp_and_range():
    z = torch.randn(1, 4, 2, 2)
    out = add_noise(z, 1.0, torch.Generator().manual_seed(0), frame="vp")
    torch.testing.assert_close(out, torch.randn(z.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 1\], got 1.5"):
        add_noise(z, 1.5)


def test_add_noise_bf16_input_returns_float32():
    z = torch.randn(1, 16, 2, 2).bfloat16()
    out = add_noise(z, 0.5, torch.Generator().manual_seed(1))
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Weight files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_single_file_ldm_layout(tmp_path, name):
    vae = tiny_kl(name, seed=4)
    ldm = to_ldm(vae.state_dict())
    assert any(k.startswith("encoder.down.0.block.0.") for k in ldm)
    file = tmp_path / "ae.safetensors"
    save_file(ldm, str(file))
    bb = load_backbone(name, file, config=kl_config(name))
    assert_same_weights(bb.vae, vae)
    x = images(1)
    torch.testing.assert_close(bb.encode(x), load_backbone(name, module=vae).encode(x), rtol=0, atol=0)


def test_single_file_diffusers_layout(tmp_path):
    vae = tiny_kl("sd3", seed=5)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in vae.state_dict().items()}, str(file))  # SD3 ships fp16
    bb = load_backbone("sd3", tmp_path, config=kl_config("sd3"))
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(bb.vae.state_dict()[k], v.half().float(), rtol=0, atol=0)


def test_single_file_flux2_bfl_layout(tmp_path):
    vae = tiny_flux2(seed=6)
    state = vae.state_dict()
    bfl = to_ldm({k: v for k, v in state.items() if not k.startswith(("quant_conv", "post_quant_conv", "bn."))})
    for k, v in state.items():
        if k.startswith("quant_conv."):
            bfl["encoder." + k] = v
        elif k.startswith("post_quant_conv."):
            bfl["decoder." + k] = v
        elif k.startswith("bn."):
            bfl[k] = v
    file = tmp_path / "ae.safetensors"
    save_file(bfl, str(file))
    bb = load_backbone("flux2", file, config=flux2_config())
    assert_same_weights(bb.vae, vae)


@pytest.mark.parametrize("name", ["sd3", "qwenimage", "flux2"])
def test_diffusers_folder(tmp_path, name):
    vae = {"sd3": lambda: tiny_kl("sd3"), "qwenimage": tiny_qwen, "flux2": tiny_flux2}[name]()
    vae.save_pretrained(tmp_path / "vae")
    bb = load_backbone(name, tmp_path)  # a pipeline folder: the VAE is found in vae/
    assert_same_weights(bb.vae, vae)
    bb = load_backbone(name, tmp_path / "vae")
    assert bb.name == name


def test_folder_of_another_vae_is_refused(tmp_path):
    tiny_qwen().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a AutoencoderKLQwenImage.*needs a AutoencoderKL"):
        load_backbone("flux", tmp_path)


def test_weight_file_of_another_vae(tmp_path):
    file = tmp_path / "sdxl_vae.safetensors"
    save_file(to_ldm(tiny_kl("sdxl").state_dict()), str(file))
    with pytest.raises(ValueError, match=r"wrong shapes: .*encoder.conv_out.weight \[8, 16, 3, 3\] \(expected \[32, 16, 3, 3\]\)"):
        load_backbone("flux", file, config=kl_config("flux"))


def test_module_of_another_vae():
    with pytest.raises(ValueError, match="looks like the sd3 VAE: use backbone 'sd3'"):
        load_backbone("flux", module=tiny_kl("sd3"))
    with pytest.raises(ValueError, match="16 latent channels, got one with 4"):
        load_backbone("flux", module=tiny_kl("sdxl"))
    with pytest.raises(ValueError, match="needs a diffusers AutoencoderKLFlux2, got module=AutoencoderKL"):
        load_backbone("flux2", module=tiny_kl("flux"))


def test_missing_weight_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found at .*nope.safetensors.*ae.safetensors \(black-forest-labs/FLUX.1-dev\)"):
        load_backbone("flux", tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="FLUX.2-dev"):
        load_backbone("flux2", tmp_path)  # an empty folder


def test_path_and_module_exclusive(tmp_path):
    with pytest.raises(ValueError, match="either path= or module="):
        load_backbone("flux", tmp_path, module=tiny_kl("flux"))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_encode_refuses_wrong_size():
    bb = load_backbone("flux", module=tiny_kl("flux"))
    with pytest.raises(ValueError, match=r"multiples of 16, got 40x48.*crops to 32x48"):
        bb.encode(images(1, 40, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*got shape \(1, 4, 32, 32\)"):
        bb.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="got dtype torch.uint8"):
        bb.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_decode_refuses_wrong_channels():
    bb = load_backbone("flux", module=tiny_kl("flux"))
    with pytest.raises(ValueError, match=r"expects latents with 16 channels.*got 128 channels.*flux2-2k"):
        bb.decode(torch.zeros(1, 128, 4, 4))


def test_check_latent():
    check_latent("flux", torch.zeros(1, 16, 4, 4))
    check_latent("zimage", torch.zeros(1, 16, 4, 4))
    bad = torch.zeros(1, 16, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        check_latent("flux", bad)
    with pytest.raises(ValueError, match="must be 4-D.*latents_from_pipeline"):
        check_latent("flux", torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match=r"expects latents with 4 channels.*got 16.*flux, qwenimage, sd3"):
        check_latent("sdxl", torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="fixed 32x32 grid"):
        check_latent("dinov2", torch.zeros(1, 768, 16, 16))


def _u8(x: torch.Tensor) -> np.ndarray:
    return np.rint((x[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int64)


def test_image_to_tensor_crop_and_range():
    arr = np.random.default_rng(0).integers(0, 256, size=(37, 50, 3), dtype=np.uint8)
    x = image_to_tensor(Image.fromarray(arr), 16)
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    top, left = (37 - 32) // 2, (50 - 48) // 2
    torch.testing.assert_close(x[0], torch.from_numpy(arr[top:top + 32, left:left + 48]).permute(2, 0, 1).float() / 127.5 - 1)
    assert x.min() >= -1 and x.max() <= 1


def test_image_to_tensor_modes():
    grey = Image.fromarray(np.full((16, 16), 100, dtype=np.uint8), mode="L")
    assert (_u8(image_to_tensor(grey)) == 100).all()
    la = Image.fromarray(np.dstack([np.full((16, 16), 0, np.uint8), np.full((16, 16), 0, np.uint8)]), mode="LA")
    assert (_u8(image_to_tensor(la)) == 255).all()  # fully transparent -> white
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[:8, :, 3] = 0
    out = _u8(image_to_tensor(Image.fromarray(rgba, mode="RGBA")))
    assert (out[:8] == 255).all() and (out[8:, :, 0] == 200).all() and (out[8:, :, 1] == 0).all()
    pal = Image.fromarray(np.full((16, 16, 3), 30, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert (_u8(image_to_tensor(pal)) == 30).all()


def test_image_to_tensor_16bit():
    arr = np.zeros((16, 16), dtype=np.uint16)
    arr[:, 8:] = 65535
    arr[:4, :4] = 32896  # 128.0 in 8-bit terms
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = _u8(image_to_tensor(img))
    assert (out[:, 8:] == 255).all() and (out[8:, :8] == 0).all() and (out[:4, :4] == 128).all()


def test_image_to_tensor_bad_input():
    with pytest.raises(ValueError, match="smaller than the required multiple of 16"):
        image_to_tensor(Image.new("RGB", (8, 40)), 16)
    with pytest.raises(ValueError, match="expects a PIL.Image.Image, got Tensor"):
        image_to_tensor(torch.zeros(3, 16, 16), 16)


# ------------------------------------------------------------------------------------------------
# Latents from diffusers pipelines
# ------------------------------------------------------------------------------------------------

H, W = 64, 96  # LDM image size: latent 8x12, packed 4x6 tokens


def test_from_flux_pipeline_packed():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 8, 12)
    packed = FluxPipeline._pack_latents(z, 2, 16, 8, 12)  # (2, 24, 64)
    out, sigma = latents_from_pipeline("flux", packed, height=H, width=W, sigma=0.4)
    torch.testing.assert_close(out, z, rtol=0, atol=0)
    assert sigma == 0.4
    out2, _ = latents_from_pipeline(FluxPipeline, packed, height=H, width=W)
    torch.testing.assert_close(out2, z, rtol=0, atol=0)


def test_from_qwenimage_pipeline_packed():
    from diffusers import QwenImagePipeline

    z = torch.randn(1, 16, 8, 12)
    packed = QwenImagePipeline._pack_latents(z[:, :, None], 1, 16, 8, 12)
    out, _ = latents_from_pipeline("QwenImagePipeline", packed, height=H, width=W)
    torch.testing.assert_close(out, z, rtol=0, atol=0)
    expected = QwenImagePipeline._unpack_latents(packed, H, W, 8)[:, :, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_from_flux2_pipeline_packed():
    from diffusers import Flux2Pipeline

    z = torch.randn(2, 128, 4, 6)
    packed = Flux2Pipeline._pack_latents(z)  # (2, 24, 128)
    out, _ = latents_from_pipeline("flux2", packed, height=H, width=W)
    torch.testing.assert_close(out, z, rtol=0, atol=0)
    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 1, 4, 6))
    torch.testing.assert_close(out, torch.stack(list(Flux2Pipeline._unpack_latents_with_ids(packed, ids))), rtol=0, atol=0)


def test_from_klein_raw_output():
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    vae = tiny_flux2()
    normalised = torch.randn(1, 128, 4, 6)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
    raw = Flux2Pipeline._unpatchify_latents(normalised * std + mean)  # what the klein pipeline returns
    out, _ = latents_from_pipeline("flux2-klein-4b", raw, height=H, width=W, vae=vae)
    torch.testing.assert_close(out, normalised, rtol=1e-5, atol=1e-5)
    # a pipeline object carries its VAE; Flux2KleinPipeline's intermediates are packed like Flux2's
    pipe = Flux2KleinPipeline.__new__(Flux2KleinPipeline)
    pipe.__dict__["vae"] = vae
    out, _ = latents_from_pipeline(pipe, raw, height=H, width=W)
    torch.testing.assert_close(out, normalised, rtol=1e-5, atol=1e-5)
    out, _ = latents_from_pipeline(pipe, Flux2Pipeline._pack_latents(normalised), height=H, width=W, sigma=0.2)
    torch.testing.assert_close(out, normalised, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch-norm statistics.*vae=pipe.vae"):
        latents_from_pipeline("flux2-klein", raw, height=H, width=W)


@pytest.mark.parametrize("kind, c", [("sd3", 16), ("zimage", 16), ("ZImagePipeline", 16), ("StableDiffusion3Pipeline", 16)])
def test_unpacked_pipelines_pass_through(kind, c):
    z = torch.randn(1, c, 8, 12)
    out, sigma = latents_from_pipeline(kind, z, height=H, width=W, sigma=0.25)
    torch.testing.assert_close(out, z, rtol=0, atol=0)
    assert sigma == 0.25


def test_from_sdxl_converts_to_vp_frame():
    z = torch.randn(1, 4, 8, 12)
    out, sigma = latents_from_pipeline("sdxl", z, height=H, width=W, sigma=3.0)
    c = math.sqrt(10.0)
    torch.testing.assert_close(out, z / c, rtol=1e-6, atol=1e-6)
    assert sigma == pytest.approx(3.0 / c)
    out, sigma = latents_from_pipeline("StableDiffusionXLPipeline", z, height=H, width=W)
    assert sigma == 0.0 and torch.equal(out, z)


def test_pipeline_subclass_resolves_through_mro():
    from diffusers import FluxImg2ImgPipeline

    z = torch.randn(1, 16, 8, 12)
    out, _ = latents_from_pipeline(FluxImg2ImgPipeline, pack_2x2(z), height=H, width=W)
    torch.testing.assert_close(out, z, rtol=0, atol=0)


def test_pipeline_latent_errors():
    with pytest.raises(ValueError, match=r"shape \(1, 24, 64\).*expected \(B, 48, 64\)"):
        latents_from_pipeline("flux", torch.zeros(1, 24, 64), height=128, width=96)
    with pytest.raises(ValueError, match=r"expected \(B, 4, 8, 12\)"):
        latents_from_pipeline("sdxl", torch.zeros(1, 16, 8, 12), height=H, width=W)
    with pytest.raises(ValueError, match="unknown pipeline kind 'flux3'"):
        latents_from_pipeline("flux3", torch.zeros(1, 16, 8, 12), height=H, width=W)
    with pytest.raises(ValueError, match="no PiD latent space is known for pipeline int"):
        latents_from_pipeline(3, torch.zeros(1, 16, 8, 12), height=H, width=W)
    with pytest.raises(ValueError, match="multiples of 16, got 60x96"):
        latents_from_pipeline("sd3", torch.zeros(1, 16, 8, 12), height=60, width=W)
    with pytest.raises(ValueError, match=r"flow-matching σ in \[0, 1\], got 3.0"):
        latents_from_pipeline("flux", torch.zeros(1, 24, 64), height=H, width=W, sigma=3.0)


def test_capture_sigma_is_next_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    assert capture_sigma(sched, 0) == pytest.approx(float(sched.sigmas[1]))
    assert capture_sigma(sched, 3) == 0.0
    assert capture_sigma(sched, 10) == 0.0


def test_pack_tokens_raster_order():
    z = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    tokens = pack_tokens(z)
    assert tokens.shape == (1, 12, 2) and tokens[0, 5, 1] == z[0, 1, 1, 1]
