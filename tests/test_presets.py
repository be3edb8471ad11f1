"""Every released preset builds on the meta device with exactly the released keys and shapes."""

from __future__ import annotations

import pytest

from pid_decoder import ALIASES, PRESETS, build_network, resolve_preset

from .conftest import KEYS_DIR

AUX_PREFIX = "lq_proj.lq_aux_rgb_head."


def released_keys(folder: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS_DIR / f"{folder}.txt").read_text().splitlines():
        key, shape = line.split(" [", 1)
        dims = shape.rstrip("]").strip()
        out[key.removeprefix("net.")] = tuple(int(d) for d in dims.split(",")) if dims else ()
    return out


def test_fourteen_presets_with_unique_aliases():
    assert len(PRESETS) == 14
    assert len(ALIASES) == 14
    assert sorted(p.name + ".txt" for p in PRESETS.values()) == sorted(
        p.name for p in KEYS_DIR.glob("*.txt") if not p.name.startswith("_")
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_keys_and_shapes_match_release(name):
    net = build_network(name, device="meta")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    released = released_keys(name)
    training_only = {k for k in released if k.startswith(AUX_PREFIX)}
    assert training_only == (
        set(k.removeprefix("net.") for k in released_keys("_v1pt5_lq_aux_rgb_head_keys")) if "undistilled" in name else set()
    )
    assert {k: v for k, v in released.items() if k not in training_only} == ours
    assert list(ours) == [k for k in released if k not in training_only]  # same order as the reference
    assert all(p.device.type == "meta" for p in net.parameters())


@pytest.mark.parametrize(
    ("alias", "folder"),
    [
        ("flux-2k", "PiD_res2k_sr4x_official_flux_distill_4step"),
        ("flux-4k", "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step"),
        ("flux2-4k", "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step"),
        ("sd3-2k", "PiD_res2k_sr4x_official_sd3_distill_4step"),
        ("sdxl-4k", "PiD_res2kto4k_sr4x_official_sdxl_distill_4step"),
        ("qwenimage-4k", "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step"),
        ("dinov2-2k", "PiD_res2k_sr4x_official_dinov2_distill_4step"),
        ("siglip-2k", "PiD_res2k_sr8x_official_siglip_distill_4step"),
        ("flux-4k-undistilled", "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled"),
        ("pixeldit-4k", "PixelDiT_finetune_2kto4k"),
    ],
)
def test_aliases_and_folder_names_resolve(alias, folder):
    assert resolve_preset(alias).name == folder
    assert resolve_preset(folder).alias == alias
    assert resolve_preset(alias.upper()).name == folder


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="flux-4k"):
        resolve_preset("flux-8k")


def test_preset_hyperparameters():
    v1, v15 = resolve_preset("flux-2k"), resolve_preset("flux-4k")
    assert (v1.net.rope_ref_h, v1.net.lq.padding_mode, v1.net.lq.gate_type) == (1024, "zeros", "sigma_aware_per_token_per_dim")
    assert (v15.net.rope_ref_h, v15.net.lq.padding_mode, v15.net.lq.gate_type) == (2048, "replicate", "sigma_aware_per_token")
    assert resolve_preset("siglip-2k").net.lq.pixels_per_latent == 128  # 16 x 8
    assert resolve_preset("flux2-4k").net.lq.conv_latent_channels == 32
    assert resolve_preset("sdxl-4k").backbone == "sdxl"
    for p in PRESETS.values():
        if "distill_4step" in p.name:
            assert (p.sampler.kind, p.sampler.steps, p.sampler.mode) == ("student", 4, "sde")
            assert p.sampler.t_list == (0.999, 0.866, 0.634, 0.342, 0.0)
        else:
            assert p.sampler.kind == "teacher"
