"""Checkpoint loading: official .pth (weights_only), Comfy and own safetensors, strict keys, detection."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from pid_decoder import checkpoints as ck
from pid_decoder import load_network
from pid_decoder.config import NetConfig
from pid_decoder.presets import Preset, SamplerConfig

from .conftest import GOLDEN_DIR

V15 = GOLDEN_DIR / "v15_flux"
V1 = GOLDEN_DIR / "v1_flux"


def reference_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["net"]


def official(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model_ema_bf16.pth", weights_only=True)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.fixture(scope="module")
def v15_net():
    return load_network(V15 / "model_ema_bf16.pth", reference_config(V15))


def test_official_pth_loads_in_eval_mode_without_grad(v15_net):
    assert not v15_net.training
    assert all(not p.requires_grad for p in v15_net.parameters())
    assert {p.dtype for p in v15_net.parameters()} == {torch.float32}
    sd = official(V15)
    # values are the file's bf16 values; the PiT modulation keeps the reference layout in state_dict()
    ours = v15_net.state_dict()
    for k, v in sd.items():
        name = k.removeprefix("net.")
        if name.startswith("lq_proj.lq_aux_rgb_head."):
            assert name not in ours  # documented training-only head: accepted and dropped
        else:
            assert torch.equal(ours[name], v.float()), name


def test_bf16_load(v15_net):
    net = load_network(V15 / "model_ema_bf16.pth", reference_config(V15), dtype="bf16")
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    small = {n for n in dtypes if "norm" in n or n.endswith("log_alpha") or ".block.0." in n or ".block.3." in n}
    assert {dtypes[n] for n in small} == {torch.float32}  # norms and gate scalars stay float32
    assert {d for n, d in dtypes.items() if n not in small} == {torch.bfloat16}
    assert_same_weights(net, v15_net)
    assert {p.dtype for p in net.to(torch.bfloat16).y_embedder.norm.parameters()} == {torch.float32}


def test_training_copies_are_ignored(tmp_path, v15_net):
    sd = official(V15)
    extra = dict(sd)
    for prefix in ("net_ema.", "fake_score.", "discriminator."):
        extra.update({prefix + k.removeprefix("net."): v for k, v in list(sd.items())[:3]})
    torch.save(extra, tmp_path / "full.pth")
    assert_same_weights(load_network(tmp_path / "full.pth", reference_config(V15)), v15_net)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("net.final_layer.linear.bias"), "missing keys: final_layer.linear.bias"),
        (lambda sd: sd.__setitem__("net.extra.weight", torch.zeros(2)), "unexpected keys: extra.weight"),
        (
            lambda sd: sd.__setitem__("net.final_layer.linear.weight", torch.zeros(3, 5)),
            r"wrong shapes: final_layer.linear.weight \[3, 5\] \(expected \[3, 4\]\)",
        ),
    ],
)
def test_key_problems_are_errors_naming_the_keys(tmp_path, edit, message):
    sd = official(V15)
    edit(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_network(tmp_path / "bad.pth", reference_config(V15))


def test_checkpoint_of_another_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"missing keys: .*wrong shapes: lq_proj.gate_modules.0.content_proj.weight \[48, 96\]"):
        load_network(V1 / "model_ema_bf16.pth", reference_config(V15))


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"net.x": torch.zeros(1), "payload": _CreatesFile(marker)}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load .*arbitrary Python unpickling"):
        load_network(tmp_path / "evil.pth", reference_config(V15))
    assert not marker.exists()


def test_legacy_torch_serialisation_loads(tmp_path, v15_net):
    torch.save(official(V15), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert_same_weights(load_network(tmp_path / "legacy.pth", reference_config(V15)), v15_net)


def test_comfy_safetensors_without_prefix(tmp_path, v15_net):
    sd = {k.removeprefix("net."): v.contiguous() for k, v in official(V15).items()}
    save_file(sd, tmp_path / "comfy.safetensors")
    assert_same_weights(load_network(tmp_path / "comfy.safetensors", reference_config(V15)), v15_net)


def test_own_safetensors_round_trip_with_config_in_metadata(tmp_path, v15_net):
    out = ck.convert(V15 / "model_ema_bf16.pth", tmp_path / "out.safetensors", config=reference_config(V15))
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # atomic write leaves no temp file
    info = ck.describe(out)
    assert info["dtypes"] == ["bfloat16"]
    assert info["stored_config"]["hidden_size"] == 48
    loaded = load_network(out)  # no config needed: it is in the metadata
    assert loaded.config == v15_net.config
    assert_same_weights(loaded, v15_net)


def test_missing_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/<folder>/model_ema_bf16.pth"):
        load_network(tmp_path / "nope.pth", preset="flux-4k")


def test_unknown_shapes_need_a_config():
    with pytest.raises(ValueError, match="does not match any released PiD preset.*config="):
        load_network(V15 / "model_ema_bf16.pth")


def _tiny_presets(monkeypatch, backbones):
    config = NetConfig.from_reference(reference_config(V1))
    presets = {
        f"tiny_{b}": Preset(f"tiny_{b}", f"tiny-{b}", config, b, SamplerConfig(), "64 px", "test") for b in backbones
    }
    monkeypatch.setattr(ck, "PRESETS", presets)
    return presets


def test_variant_detected_from_keys(monkeypatch):
    _tiny_presets(monkeypatch, ["flux"])
    net = load_network(V1 / "model_ema_bf16.pth")
    assert net.preset.alias == "tiny-flux"
    info = ck.detect_variant(V1 / "model_ema_bf16.pth")
    assert info["family"] == "v1" and info["latent_channels"] == 16 and info["backbones"] == ["flux"]


def test_identical_shapes_require_a_preset(monkeypatch):
    _tiny_presets(monkeypatch, ["flux", "sd3"])
    with pytest.raises(ValueError, match="tiny-flux .*tiny-sd3.*Pass preset="):
        load_network(V1 / "model_ema_bf16.pth")


def test_describe_official_file():
    info = ck.describe(V15 / "model_ema_bf16.pth")
    assert info["family"] == "v1.5"
    assert info["dropped_keys"] == 6  # the auxiliary RGB head
    assert info["parameters"] == sum(
        v.numel() for k, v in official(V15).items() if "lq_aux_rgb_head" not in k
    )


def test_reference_config_rejects_unsupported_paths():
    args = dict(reference_config(V1), enable_ed=True)
    with pytest.raises(ValueError, match="enable_ed"):
        NetConfig.from_reference(args)
    cfg = NetConfig.from_reference(reference_config(V1))
    assert NetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert dataclasses.replace(cfg, hidden_size=64).head_dim == 16
