"""PiDPipeline end to end on CPU with a tiny PiD checkpoint, a tiny FLUX.1-style VAE and a tiny FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pid_decoder import sample, sample_teacher
from pid_decoder.backbones import add_noise, image_to_tensor, latents_from_pipeline, load_backbone, tensor_to_image

from .test_pipeline_support import (
    TEXT_D,
    TEXT_T,
    TINY_ALIAS,
    TINY_PRESET,
    FakeHub,
    load_tiny_net,
    make_assets,
    random_image,
    register_presets,
    tiny_flux_pipeline,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def net(assets):
    return load_tiny_net(assets["checkpoint"])


@pytest.fixture(scope="module")
def emb():
    return torch.randn(TEXT_T, TEXT_D, generator=torch.Generator().manual_seed(11))


@pytest.fixture
def presets(monkeypatch):
    register_presets(monkeypatch)


@pytest.fixture
def pipe(assets, presets):
    from pid_decoder import PiDPipeline

    return PiDPipeline.from_pretrained(TINY_ALIAS, weights_dir=assets["weights"], backbone=assets["vae"], device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def expected_image(net, latent, emb, sigma, seed, steps=4):
    lat = latent.to(torch.bfloat16).float()
    h, w = net.output_size(tuple(lat.shape[-2:]))
    out = sample(net, lat, emb[None], sigma, height=h, width=w, steps=steps, generator=torch.Generator().manual_seed(seed))
    return pixels(tensor_to_image(out))


# --------------------------------------------------------------------------- decode
def test_decode_equals_sample_with_cpu_generator(pipe, net, emb):
    latents = torch.randn(2, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    images = pipe.decode(latents, text_embedding=emb, seed=7)
    assert [im.size for im in images] == [(96, 64)] * 2
    np.testing.assert_array_equal(pixels(images[0]), expected_image(net, latents[:1], emb, 0.0, 7))
    np.testing.assert_array_equal(pixels(images[1]), expected_image(net, latents[1:], emb, 0.0, 8))  # item i: seed + i


def test_noise_device_defaults_to_cpu_off_cuda_and_is_validated(assets, presets, net):
    from pid_decoder import PiDPipeline

    assert PiDPipeline(net, TINY_ALIAS).noise_device == torch.device("cpu")
    assert PiDPipeline(net, TINY_ALIAS, noise_device="cpu").generator(3).device.type == "cpu"
    with pytest.raises(ValueError, match="noise device must be 'auto', 'cpu' or a CUDA device"):
        PiDPipeline(net, TINY_ALIAS, noise_device="mps")


def test_speed_and_memory_options_are_checked_up_front(presets, net):
    from pid_decoder import PiDPipeline

    with pytest.raises(ValueError, match="multiple"):
        PiDPipeline(net, TINY_ALIAS, tile=40)
    with pytest.raises(ValueError, match="overlap"):
        PiDPipeline(net, TINY_ALIAS, tile=32, tile_overlap=32)
    with pytest.raises(ValueError, match="cannot read memory budget"):
        PiDPipeline(net, TINY_ALIAS, max_memory="lots")
    assert PiDPipeline(net, TINY_ALIAS, max_memory="2GB").max_memory == 2 * 2**30


def test_decode_sigma_and_3d_latent(pipe, net, emb):
    latent = torch.randn(16, 2, 2, generator=torch.Generator().manual_seed(1))
    image = pipe.decode(latent, text_embedding=emb, sigma=0.4, seed=3)[0]
    np.testing.assert_array_equal(pixels(image), expected_image(net, latent[None], emb, 0.4, 3))


def test_decode_baseline_is_native_vae_decode(pipe, emb):
    latent = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(2))
    images, baselines = pipe.decode(latent, text_embedding=emb, return_baseline=True)
    assert images[0].size == (96, 64) and baselines[0].size == (24, 16)
    expected = tensor_to_image(pipe.backbone.decode(latent.to(torch.bfloat16).float()))
    np.testing.assert_array_equal(pixels(baselines[0]), pixels(expected))


def test_decode_text_embedding_file_and_steps(pipe, net, assets):
    from pid_decoder.text import load_text_embedding

    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(4))
    image = pipe.decode(latent, text_embedding=assets["embedding"], steps=2, seed=1)[0]
    emb, _ = load_text_embedding(assets["embedding"])
    np.testing.assert_array_equal(pixels(image), expected_image(net, latent, emb, 0.0, 1, steps=2))


@pytest.mark.parametrize(
    "latent, message",
    [
        (torch.randn(1, 4, 2, 2), "expects latents with 16 channels"),
        (torch.full((1, 16, 2, 2), float("nan")), "NaN"),
        (torch.randn(2, 2), "4-D"),
    ],
)
def test_decode_bad_latents(pipe, emb, latent, message):
    with pytest.raises(ValueError, match=message):
        pipe.decode(latent, text_embedding=emb)


def test_decode_bad_sigma(pipe, emb):
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 1\]"):
        pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=emb, sigma=1.5)


def test_text_encoder_never_built_with_embedding(pipe, emb):
    pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=emb, steps=1)
    assert pipe._text_encoder is None


# --------------------------------------------------------------------------- upscale
def test_upscale_matches_reference_recipe(pipe, net, emb):
    image = random_image(34, 19, seed=1)  # centre-cropped to 32x16
    outs, baselines = pipe.upscale([image, image], text_embedding=emb, sigma=0.3, seed=5, index_offset=2,
                                   return_baseline=True)
    assert outs[0].size == (128, 64) and baselines[0].size == (32, 16)
    backbone = pipe.backbone
    for i in range(2):
        index = 2 + i
        z = backbone.encode(image_to_tensor(image, 16))
        z = add_noise(z, 0.3, torch.Generator().manual_seed(5 + index)).to(torch.bfloat16).float()
        np.testing.assert_array_equal(pixels(outs[i]), expected_image(net, z, emb, 0.3, 5 + index))
    assert not np.array_equal(pixels(outs[0]), pixels(outs[1]))  # different seeds per index


def test_upscale_sigma_zero_draws_no_latent_noise(pipe, net, emb):
    image = random_image(16, 16, seed=2, mode="RGBA")
    out = pipe.upscale(image, text_embedding=emb, seed=9)[0]
    z = pipe.backbone.encode(image_to_tensor(image, 16))
    np.testing.assert_array_equal(pixels(out), expected_image(net, z, emb, 0.0, 9))


def test_upscale_needs_backbone(assets, presets, emb):
    from pid_decoder import PiDPipeline

    pipe = PiDPipeline.from_pretrained(TINY_ALIAS, weights_dir=assets["weights"], backbone=False, device="cpu")
    with pytest.raises(ValueError, match="needs the backbone"):
        pipe.upscale(random_image(32, 32), text_embedding=emb)


# --------------------------------------------------------------------------- construction and weights
def test_constructor_and_checkpoint_path(assets, net, emb):
    from pid_decoder import PiDPipeline

    backbone = load_backbone("flux", assets["vae"])
    direct = PiDPipeline(net, None, backbone, None, backbone_name="flux")
    from_file = PiDPipeline.from_pretrained(
        assets["checkpoint"], config=net.config, backbone=assets["vae"], backbone_name="flux", device="cpu"
    )
    latent = torch.randn(1, 16, 2, 2)
    a = direct.decode(latent, text_embedding=emb)[0]
    b = from_file.decode(latent, text_embedding=emb)[0]
    np.testing.assert_array_equal(pixels(a), pixels(b))
    assert from_file.scale == 4 and from_file.device == torch.device("cpu") and from_file.net.dtype == torch.float32


def test_bf16_on_cpu(assets, presets, emb):
    from pid_decoder import PiDPipeline

    pipe = PiDPipeline.from_pretrained(TINY_ALIAS, weights_dir=assets["weights"], backbone=assets["vae"], device="cpu",
                                       dtype="bf16")
    assert pipe.net.dtype == torch.bfloat16
    assert pipe.decode(torch.randn(1, 16, 2, 2), text_embedding=emb, steps=1)[0].size == (64, 64)


def test_weights_downloaded_from_fake_hub(tmp_path, assets, presets, monkeypatch, emb):
    from pid_decoder import PiDPipeline, weights
    from pid_decoder.presets import PRESETS

    hub = FakeHub(tmp_path / "hub")
    hub.add("nvidia/PiD", PRESETS[TINY_PRESET].checkpoint_path, assets["checkpoint"])
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        hub.add("test/tiny-vae", name, assets["vae"] / name)
    spec = weights.WeightSpec(
        "tiny VAE",
        (
            weights.HubFile("tiny_vae/diffusion_pytorch_model.safetensors", "test/tiny-vae",
                            "diffusion_pytorch_model.safetensors"),
            weights.HubFile("tiny_vae/config.json", "test/tiny-vae", "config.json"),
        ),
        load_levels=1,
    )
    monkeypatch.setitem(weights.BACKBONE_WEIGHTS, "flux", spec)
    monkeypatch.setattr(weights, "_hub_download", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("PID_WEIGHTS_DIR", str(tmp_path / "mirror"))

    pipe = PiDPipeline.from_pretrained(TINY_ALIAS, device="cpu")
    assert (tmp_path / "mirror" / PRESETS[TINY_PRESET].checkpoint_path).is_file()
    assert (tmp_path / "mirror" / "tiny_vae" / "config.json").is_file()
    assert len(hub.calls) == 3
    assert pipe.upscale(random_image(16, 16), text_embedding=emb, steps=1)[0].size == (64, 64)
    PiDPipeline.from_pretrained(TINY_ALIAS, device="cpu")  # second time: everything is local
    assert len(hub.calls) == 3


def test_offline_missing_weights_lists_every_file(tmp_path, monkeypatch):
    from pid_decoder import PiDPipeline, weights

    monkeypatch.setattr(weights, "_hub_download", FakeHub(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.MissingWeightsError) as info:
        PiDPipeline.from_pretrained("flux-2k", weights_dir=tmp_path / "w", device="cpu")
    message = str(info.value)
    assert str(tmp_path / "w") in message
    assert "checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth" in message
    assert "checkpoints/ae.safetensors" in message
    assert "hf download nvidia/PiD" in message and "HF_HUB_OFFLINE" in message


def test_failed_download_is_reported(tmp_path, monkeypatch):
    from pid_decoder import weights

    monkeypatch.setattr(weights, "_hub_download", FakeHub(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(weights.MissingWeightsError, match="download failed"):
        weights.resolve(weights.preset_files("sdxl-4k"), tmp_path / "w")


def test_each_file_is_asked_of_the_hub_once_at_its_known_path(tmp_path, monkeypatch):
    from pid_decoder import weights

    hub = FakeHub(tmp_path / "hub")
    source = tmp_path / "ae.bin"
    source.write_bytes(b"vae")
    hub.add("nvidia/PiD", "ae.safetensors", source)  # at the repo root: not the release layout, not guessed
    monkeypatch.setattr(weights, "_hub_download", hub)
    with pytest.raises(weights.MissingWeightsError, match="(?s)checkpoints/ae.safetensors.*download failed: FileNotFoundError: 404"):
        weights.resolve([weights.backbone_spec("zimage")], tmp_path / "w", allow_download=True)
    assert [c[1] for c in hub.calls] == ["checkpoints/ae.safetensors"]


def test_weights_dir_may_be_the_checkpoints_folder(tmp_path, assets, presets):
    from pid_decoder import weights
    from pid_decoder.presets import PRESETS

    found = weights.resolve([weights.checkpoint_spec(TINY_ALIAS)], assets["weights"] / "checkpoints",
                            allow_download=False)
    assert found == [assets["weights"] / PRESETS[TINY_PRESET].checkpoint_path]


@pytest.mark.parametrize("preset", ["flux-4k", "flux2-4k", "sd3-2k", "sdxl-4k", "qwenimage-4k", "dinov2-2k", "siglip-2k"])
def test_every_backbone_has_weight_files(preset):
    from pid_decoder import weights

    specs = weights.preset_files(preset)
    assert len(specs) == 2 and all(spec.files for spec in specs)


# --------------------------------------------------------------------------- teacher
def test_teacher_preset_uses_dpm_solver_with_negative(assets, presets, net, emb):
    from pid_decoder import PiDPipeline

    negative = torch.randn(TEXT_T, TEXT_D, generator=torch.Generator().manual_seed(5))
    pipe = PiDPipeline.from_pretrained("tiny-flux-teacher", weights_dir=assets["weights"], backbone=False, device="cpu")
    pipe.negative_embedding = negative
    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(6))
    image = pipe.decode(latent, text_embedding=emb, seed=4)[0]
    lat = latent.to(torch.bfloat16).float()
    out = sample_teacher(net, lat, emb[None], 0.0, negative_text=negative, height=64, width=64, steps=2,
                         cfg_scale=3.0, generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(pixels(image), pixels(tensor_to_image(out)))


# --------------------------------------------------------------------------- generate / pipeline latents
@pytest.fixture(scope="module")
def ldm(assets):
    from diffusers import AutoencoderKL

    return tiny_flux_pipeline(AutoencoderKL.from_pretrained(assets["vae"]))


def test_generate_captures_steps_and_x0(pipe, ldm, net, emb):
    results = pipe.generate("a cat", ldm_pipeline=ldm, resolution=128, ldm_steps=4, capture_steps=[3, 2], seed=1,
                            text_embedding=emb, return_baseline=True, steps=2)
    sigmas = ldm.scheduler.sigmas.tolist()
    assert [r.label for r in results] == ["step_2", "step_3", "x0"]
    assert [r.sigma for r in results] == pytest.approx([sigmas[2], sigmas[3], 0.0])
    for r in results:
        assert r.image.size == (128, 128) and r.baseline.size == (32, 32)
        np.testing.assert_array_equal(pixels(r.image), expected_image(net, r.latent, emb, r.sigma, 1, steps=2))
    # the final latent is what the pipeline itself returns
    out = ldm("a cat", height=32, width=32, num_inference_steps=4, guidance_scale=3.5, output_type="latent",
              generator=torch.Generator().manual_seed(1), max_sequence_length=512)
    final, _ = latents_from_pipeline(ldm, out.images, height=32, width=32)
    torch.testing.assert_close(results[-1].latent, final.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_generate_defaults_and_errors(pipe, ldm, emb):
    results = pipe.generate("a dog", ldm_pipeline=ldm, resolution=(128, 64), ldm_steps=2, text_embedding=emb,
                            steps=1)
    assert [r.label for r in results] == ["x0"]  # flux's recommended step 24 does not exist in a 2-step run
    assert results[0].image.size == (128, 64)


def test_generate_rejects_bad_requests(pipe, ldm, emb):
    with pytest.raises(ValueError, match="capture steps must be in 1..2"):
        pipe.generate("x", ldm_pipeline=ldm, resolution=256, ldm_steps=2, capture_steps=[5], text_embedding=emb)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate("x", ldm_pipeline=ldm, resolution=200, ldm_steps=2, text_embedding=emb)


def test_decode_pipeline_latents_is_a_vae_decode_drop_in(pipe, ldm, net, emb):
    from diffusers import FluxPipeline

    z = torch.randn(1, 16, 2, 4, generator=torch.Generator().manual_seed(3))
    packed = FluxPipeline._pack_latents(z, 1, 16, 2, 4)  # what output_type="latent" returns
    images, baselines = pipe.decode_pipeline_latents(ldm, packed, height=16, width=32, text_embedding=emb, seed=2,
                                                     return_baseline=True)
    np.testing.assert_array_equal(pixels(images[0]), expected_image(net, z, emb, 0.0, 2))
    assert baselines[0].size == (32, 16)


def test_pipeline_of_another_latent_space_is_refused(pipe, emb):
    from diffusers import StableDiffusionXLPipeline

    fake = StableDiffusionXLPipeline.__new__(StableDiffusionXLPipeline)
    with pytest.raises(ValueError, match="produces sdxl latents"):
        pipe.decode_pipeline_latents(fake, torch.randn(1, 4, 8, 8), height=64, width=64, text_embedding=emb)
