"""dinov2 (RAE) and siglip (Scale-RAE) backbones on tiny random encoders/decoders with a 4x4 token grid."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pid_decoder.backbones import load_backbone
from pid_decoder.backbones.rae import remap_decoder_state

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

GRID = 4
DEC = dict(decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64)


def legacy_decoder_state(decoder: torch.nn.Module) -> dict:
    """diffusers RAEDecoder names -> the published transformers-4.x ViT-MAE names (backbones.md §8)."""
    renames = (
        (".attention.to_q.", ".attention.attention.query."),
        (".attention.to_k.", ".attention.attention.key."),
        (".attention.to_v.", ".attention.attention.value."),
        (".attention.to_out.0.", ".attention.output.dense."),
    )
    out = {}
    for k, v in decoder.state_dict().items():
        for new, old in renames:
            k = k.replace(new, old)
        out[k] = v.clone()
    out["decoder_pos_embed"] = torch.zeros(1, GRID * GRID + 1, DEC["decoder_hidden_size"])  # ignored on load
    return out


def sincos_table(dim: int, grid: int) -> torch.Tensor:
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    return get_2d_sincos_pos_embed(dim, grid, cls_token=True, extra_tokens=1, base_size=grid, output_type="pt").float()


# ------------------------------------------------------------------------------------------------
# dinov2
# ------------------------------------------------------------------------------------------------


def tiny_rae(seed: int = 0, **stats):
    torch.manual_seed(seed)
    return diffusers.AutoencoderRAE(
        encoder_type="dinov2",
        encoder_hidden_size=64,  # diffusers uses hidden/64 heads
        encoder_patch_size=14,
        encoder_num_hidden_layers=1,
        encoder_input_size=14 * GRID,
        patch_size=16,
        image_size=16 * GRID,
        **DEC,
        **stats,
    ).eval()


def test_dinov2_encode_decode_from_module():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(64, GRID, GRID, generator=g), torch.rand(64, GRID, GRID, generator=g) + 0.5
    rae = tiny_rae(latents_mean=mean, latents_std=std)
    bb = load_backbone("dinov2", module=rae)
    assert (bb.latent_channels, bb.grid, bb.down_factor) == (64, GRID, 16)
    x = torch.rand(2, 3, 64, 48) * 2 - 1  # non-square: squashed to 56x56 like the reference
    z = bb.encode(x)
    assert z.shape == (2, 64, GRID, GRID)
    with torch.no_grad():
        x01 = F.interpolate((x + 1) / 2, size=(56, 56), mode="bicubic", align_corners=False)
        expected = rae.encode(x01).latent  # diffusers' own normalisation (z − mean)/(std + 1e-5)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)

    # correction 2: the decoder position table is the sin-cos of the real grid
    torch.testing.assert_close(rae.decoder.decoder_pos_embed[0], sincos_table(32, GRID), rtol=0, atol=0)
    out = bb.decode(z)
    assert out.shape == (2, 3, 64, 64)
    with torch.no_grad():
        ref = rae.decode(z).sample.clamp(0, 1) * 2 - 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def write_dinov2_folder(tmp_path, seed: int = 1):
    torch.manual_seed(seed)
    enc_cfg = transformers.Dinov2WithRegistersConfig(
        hidden_size=64, num_attention_heads=1, num_hidden_layers=1, intermediate_size=128, patch_size=14, image_size=518
    )
    encoder = transformers.Dinov2WithRegistersModel(enc_cfg).eval()
    encoder.save_pretrained(tmp_path / "encoder")
    decoder_src = tiny_rae(seed + 1).decoder
    torch.save(legacy_decoder_state(decoder_src), tmp_path / "model.pt")
    g = torch.Generator().manual_seed(seed)
    stats = {"mean": torch.randn(64, GRID, GRID, generator=g), "var": torch.rand(64, GRID, GRID, generator=g) + 0.1}
    torch.save(stats, tmp_path / "stat.pt")
    config = {"_class_name": "AutoencoderRAE", "encoder_input_size": 14 * GRID, "patch_size": 16, "image_size": 16 * GRID, **DEC}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return encoder, decoder_src, stats


def test_dinov2_from_files(tmp_path):
    encoder, decoder_src, stats = write_dinov2_folder(tmp_path)
    bb = load_backbone("dinov2", tmp_path)
    for k, v in decoder_src.state_dict().items():
        if k != "decoder_pos_embed":
            torch.testing.assert_close(bb.rae.decoder.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = bb.encode(x)
    with torch.no_grad():
        x01 = F.interpolate((x + 1) / 2, size=(56, 56), mode="bicubic", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        hidden = encoder((x01 - mean) / std).last_hidden_state  # default LN affine is identity
        tokens = hidden[:, 5:].transpose(1, 2).reshape(1, 64, GRID, GRID)
        expected = (tokens - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    # correction 1: the module's own encode agrees with the reference statistics too
    with torch.no_grad():
        torch.testing.assert_close(bb.rae.encode(x01).latent, expected, rtol=1e-4, atol=1e-5)
    assert bb.decode(z).shape == (1, 3, 64, 64)


def test_dinov2_missing_and_wrong_files(tmp_path):
    write_dinov2_folder(tmp_path)
    (tmp_path / "stat.pt").unlink()
    with pytest.raises(FileNotFoundError, match="stat.pt.*nyu-visionx/RAE-collections"):
        load_backbone("dinov2", tmp_path)
    torch.save({"mean": torch.zeros(768, 32, 32), "var": torch.ones(768, 32, 32)}, tmp_path / "stat.pt")
    with pytest.raises(ValueError, match=r"mean has shape \(768, 32, 32\), expected \(64, 4, 4\)"):
        load_backbone("dinov2", tmp_path)


def test_dinov2_latent_checks():
    bb = load_backbone("dinov2", module=tiny_rae())
    with pytest.raises(ValueError, match="fixed 4x4 grid"):
        bb.decode(torch.zeros(1, 64, 8, 8))
    with pytest.raises(ValueError, match="expects latents with 64 channels"):
        bb.decode(torch.zeros(1, 16, GRID, GRID))


def test_remap_decoder_state_transformers5_names():
    state = {"decoder_layers.0.attention.q_proj.weight": 1, "decoder_layers.0.mlp.fc1.bias": 2, "decoder_pos_embed": 3}
    assert remap_decoder_state(state) == {
        "decoder_layers.0.attention.to_q.weight": 1,
        "decoder_layers.0.intermediate.dense.bias": 2,
    }


# ------------------------------------------------------------------------------------------------
# siglip
# ------------------------------------------------------------------------------------------------


def tiny_siglip(seed: int = 0):
    from diffusers.models.autoencoders.autoencoder_rae import RAEDecoder

    torch.manual_seed(seed)
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, patch_size=14,
        image_size=14 * GRID, layer_norm_eps=1e-6,
    )
    encoder = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # a non-trivial post-LN affine, which the backbone must not use
        encoder.post_layernorm.weight.normal_()
        encoder.post_layernorm.bias.normal_()
    decoder = RAEDecoder(hidden_size=32, num_patches=GRID * GRID, patch_size=14, image_size=14 * GRID, **DEC).eval()
    return encoder, decoder


def siglip_reference_tokens(encoder, x):
    x01 = F.interpolate((x + 1) / 2, size=(56, 56), mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        hidden = encoder(pixel_values=(x01 - 0.5) / 0.5, output_hidden_states=True).hidden_states[-1]
    tokens = F.layer_norm(hidden, (32,), eps=1e-6)
    return tokens.transpose(1, 2).reshape(x.shape[0], 32, GRID, GRID)


def test_siglip_encode_decode_from_module():
    encoder, decoder = tiny_siglip()
    bb = load_backbone("siglip", module=(encoder, decoder))
    assert (bb.latent_channels, bb.grid, bb.down_factor) == (32, GRID, 16)
    x = torch.rand(2, 3, 80, 64) * 2 - 1
    z = bb.encode(x)
    torch.testing.assert_close(z, siglip_reference_tokens(encoder, x), rtol=1e-5, atol=1e-5)
    out = bb.decode(z)
    assert out.shape == (2, 3, 64, 64)
    with torch.no_grad():
        logits = decoder(z.flatten(2).transpose(1, 2), drop_cls_token=False).logits
        img = (decoder.unpatchify(logits) * 0.5 + 0.5).clamp(0, 1)
        ref = F.interpolate(img, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_siglip_from_files(tmp_path):
    encoder, decoder = tiny_siglip(3)
    encoder.save_pretrained(tmp_path / "encoder")
    torch.save(legacy_decoder_state(decoder), tmp_path / "siglip2_sop14_i224_web73M_ganw3_decXL.pt")
    (tmp_path / "XL_decoder_config.json").write_text(json.dumps({"hidden_size": 1152, "patch_size": 14, **DEC}))
    bb = load_backbone("siglip", tmp_path)
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    torch.testing.assert_close(bb.encode(x), siglip_reference_tokens(encoder, x), rtol=1e-5, atol=1e-5)
    ref = load_backbone("siglip", module=(encoder, decoder))
    z = torch.randn(1, 32, GRID, GRID)
    torch.testing.assert_close(bb.decode(z), ref.decode(z), rtol=0, atol=0)


def test_siglip_bad_module_and_missing_decoder(tmp_path):
    encoder, decoder = tiny_siglip()
    with pytest.raises(ValueError, match=r"module=\(SiglipVisionModel, RAEDecoder\)"):
        load_backbone("siglip", module=encoder)
    with pytest.raises(FileNotFoundError, match="Scale-RAE decoder .pt.*nyu-visionx/siglip2_decoder"):
        load_backbone("siglip", tmp_path)
