"""First run, offline use, the reference's download layout and bad weight/config inputs (issue 11).

Every bad input gets one test that checks the exception type, that the culprit is named and that the fix is
suggested. The offline path runs against a hub address that refuses connections; nothing here uses the network.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import socket
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from pid_decoder import checkpoints as ck
from pid_decoder import weights
from pid_decoder.checkpoints import describe, load_network, open_checkpoint
from pid_decoder.config import load_net_config
from pid_decoder.devices import check_device
from pid_decoder.text import MissingTextEncoderError, TextEncoder, load_text_embedding

from .test_pipeline_support import TEXT_D, TEXT_T, random_image, save_tiny_checkpoint, tiny_net_config

diffusers = pytest.importorskip("diffusers")

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


# --------------------------------------------------------------------------- helpers
def closed_port() -> int:
    """A local TCP port nobody listens on: connecting to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def refusing_hub(tmp_path, monkeypatch):
    """HF_ENDPOINT at a closed local port, an empty HF cache, downloads allowed; counts hub probes."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    try:  # huggingface_hub fetches an "agent registry" from the public hub before its first request
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY, raising=False)
    except ImportError:
        pass
    probes: list[tuple[str, str]] = []
    real_probe = weights._hub_probe

    def probe(repo, filename):
        probes.append((repo, filename))
        return real_probe(repo, filename)

    monkeypatch.setattr(weights, "_hub_probe", probe)
    return probes


@pytest.fixture
def local_server(refusing_hub, monkeypatch):
    """A local HTTP server answering 404 to everything, with or without the hub's headers; HF_ENDPOINT at it."""
    import http.server
    import threading

    state = {"hub_headers": False, "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            state["requests"] += 1
            self.send_response(404)
            if state["hub_headers"]:
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Request-Id", "test")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield state
    server.shutdown()
    server.server_close()


def test_a_proxy_answering_404_is_not_the_hub(local_server, tmp_path):
    with pytest.raises(weights.MissingWeightsError, match=r"could not be reached .*404 without Hugging Face headers"):
        weights.check_run_files("flux-2k", weights_dir=tmp_path, need_backbone=True)
    assert local_server["requests"] == 1


def test_the_hub_answering_404_names_the_file_and_tries_the_next(local_server, tmp_path):
    local_server["hub_headers"] = True
    with pytest.raises(weights.MissingWeightsError) as info:
        weights.check_run_files("flux-2k", weights_dir=tmp_path)
    assert str(info.value).count("not found on the hub (404)") == 2 and local_server["requests"] == 2


def no_network(monkeypatch):
    """Fail the test if anything asks the hub (a download or a probe)."""

    def refuse(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise FileNotFoundError("not in the local cache")
        raise AssertionError(f"the hub was asked: {args}")

    monkeypatch.setattr(weights, "_hub_download", refuse)
    monkeypatch.setattr(weights, "_hub_probe", lambda *a: (_ for _ in ()).throw(AssertionError("probe")))


# --------------------------------------------------------------------------- first run, offline
def test_refusing_hub_one_fast_message_with_every_file(refusing_hub, tmp_path, caplog):
    caplog.set_level("DEBUG")
    start = time.monotonic()
    with pytest.raises(weights.MissingWeightsError) as info:
        weights.check_run_files("flux-2k", weights_dir=tmp_path / "w", needs_text_encoder=True)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"offline answer took {elapsed:.1f} s"
    assert len(refusing_hub) == 1  # the first refused connection ends all attempts: no retries, no second URL
    message = str(info.value)
    for needed in (
        "checkpoints/PiD_res2k_sr4x_official_flux_distill_4step/model_ema_bf16.pth",
        "checkpoints/ae.safetensors",
        "Efficient-Large-Model/gemma-2-2b-it",
    ):
        assert message.count(needed) >= 1, needed
    assert "could not be reached" in message and "Connection refused" in message
    assert "--text-embedding" in message and "HF_HUB_OFFLINE=1" in message and "hf download nvidia/PiD" in message
    hub_warnings = [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelname == "WARNING"]
    assert hub_warnings == []  # huggingface_hub never reached its retry loop
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("pid_decoder") and r.levelno >= 20]
    assert len(ours) == len(set(ours)) and not any("downloading" in m for m in ours)


def test_refusing_hub_without_weights_dir_names_the_flag(refusing_hub):
    with pytest.raises(weights.MissingWeightsError) as info:
        weights.check_run_files("sdxl-4k", needs_text_encoder=False)
    message = str(info.value)
    assert "--weights-dir" in message and "sdxl_vae/diffusion_pytorch_model.safetensors" in message
    assert "checkpoints/sdxl_vae.safetensors" in message  # the reference's place is mentioned too
    assert "gemma" not in message  # no prompt to encode: Gemma is not needed


def test_hf_hub_offline_asks_nothing(tmp_path, monkeypatch):
    no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.MissingWeightsError, match="downloads are off") as info:
        weights.check_run_files("qwenimage-4k", weights_dir=tmp_path, needs_text_encoder=True,
                                text_encoder=tmp_path / "no-gemma")
    message = str(info.value)
    assert "qwenimage_vae/vae/diffusion_pytorch_model.safetensors" in message
    assert "QwenImage_VAE_2d.pth" in message and "no-gemma' does not exist" in message


def test_first_unreachable_answer_ends_all_attempts(tmp_path, monkeypatch):
    calls = []

    def hub(repo, filename, *, local_dir, local_files_only):
        if local_files_only:
            raise FileNotFoundError("not cached")
        calls.append(filename)
        raise weights.HubUnreachable("http://hub: ConnectError: refused")

    monkeypatch.setattr(weights, "_hub_download", hub)
    with pytest.raises(weights.MissingWeightsError) as info:
        weights.resolve(weights.preset_files("dinov2-2k"), tmp_path, allow_download=True)
    assert len(calls) == 1
    assert str(info.value).count("from hf://nvidia/PiD/") == 3  # checkpoint, decoder and statistics all listed


def test_a_file_the_hub_refuses_does_not_stop_the_others(tmp_path, monkeypatch):
    calls = []

    def hub(repo, filename, *, local_dir, local_files_only):
        if local_files_only:
            raise FileNotFoundError("not cached")
        calls.append(filename)
        if len(calls) == 1:
            raise FileNotFoundError("404 Not Found")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
        return str(target)

    monkeypatch.setattr(weights, "_hub_download", hub)
    with pytest.raises(weights.MissingWeightsError, match="download failed: FileNotFoundError: 404") as info:
        weights.resolve(weights.preset_files("flux-4k"), tmp_path, allow_download=True)
    assert len(calls) == 2 and "ae.safetensors" not in str(info.value).split("to fetch")[0].split("\n", 2)[-1]


def test_gemma_present_in_a_folder_or_not_needed(tmp_path, monkeypatch):
    no_network(monkeypatch)
    save_tiny_checkpoint(tmp_path / "checkpoints" / "PiD_res2k_sr4x_official_flux_distill_4step" / "model_ema_bf16.pth")
    (tmp_path / "checkpoints" / "ae.safetensors").write_bytes(b"x")
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    with pytest.raises(weights.MissingWeightsError, match="has no config.json"):
        weights.check_run_files("flux-2k", weights_dir=tmp_path, needs_text_encoder=True, text_encoder=gemma,
                                allow_download=False)
    (gemma / "config.json").write_text("{}")
    files = weights.check_run_files("flux-2k", weights_dir=tmp_path, needs_text_encoder=True, text_encoder=gemma,
                                    allow_download=False)
    assert files.text_encoder == str(gemma) and files.offline
    assert files.checkpoint.name == "model_ema_bf16.pth" and files.backbone.name == "ae.safetensors"
    files = weights.check_run_files("flux-2k", weights_dir=tmp_path, need_backbone=False)
    assert files.backbone is None and files.text_encoder is None


def test_own_checkpoint_and_backbone_are_checked_not_downloaded(tmp_path, monkeypatch):
    no_network(monkeypatch)
    own = save_tiny_checkpoint(tmp_path / "mine.pth")
    files = weights.check_run_files(None, checkpoint=own, backbone="flux", backbone_path=tmp_path)
    assert files.checkpoint is None and files.backbone is None
    with pytest.raises(ValueError, match=r"is a directory; pass the .pth/.safetensors file inside it \(found: mine.pth\)"):
        weights.check_run_files(None, checkpoint=tmp_path)
    with pytest.raises(FileNotFoundError, match="--backbone-path"):
        weights.check_run_files(None, checkpoint=own, backbone="flux", backbone_path=tmp_path / "nope")


def test_needs_model_reads_only_the_embedding_cache(tmp_path):
    enc = TextEncoder(tmp_path / "gemma-folder", cache_dir=tmp_path / "cache")
    assert enc.needs_model("a cat")
    enc._cache.put(enc.identity, "a cat", torch.randn(TEXT_T, TEXT_D))
    assert not enc.needs_model("a cat") and enc.needs_model(["a cat", "a dog"])
    assert TextEncoder(tmp_path / "g", cache_dir=False).needs_model("")
    assert not enc.loaded


def test_missing_text_encoder_message_speaks_cli_and_api(tmp_path):
    with pytest.raises(MissingTextEncoderError) as info:
        TextEncoder(tmp_path / "nowhere", cache_dir=False).encode("")
    message = str(info.value)
    assert "--text-encoder" in message and "--text-embedding" in message
    assert "text_encoder=" in message and "text_embedding=" in message and "local_files_only=True" not in message


# --------------------------------------------------------------------------- the reference's layout
QWEN_TINY = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_scales": [],
             "temperal_downsample": [False, True, True]}
SDXL_TINY = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4}
SDXL_NAME = "PiD_res2kto4k_sr4x_official_sdxl_distill_4step"
QWEN_NAME = "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step"


def tiny_qwen_vae(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKLQwenImage(**QWEN_TINY).eval()


@pytest.fixture
def reference_folder(tmp_path, monkeypatch):
    """`hf download nvidia/PiD --include "checkpoints/*"` in miniature, with presets and configs made tiny."""
    from pid_decoder import presets
    from pid_decoder.backbones import weights as bb_weights
    from pid_decoder.backbones.qwenimage import state_3d_to_2d

    configs = tmp_path / "configs"
    shutil.copytree(bb_weights.CONFIG_DIR, configs)
    for name, tiny in (("sdxl_vae.json", SDXL_TINY), ("qwenimage_vae.json", QWEN_TINY)):
        cfg = json.loads((configs / name).read_text())
        cfg.update(tiny)
        (configs / name).write_text(json.dumps(cfg))
    monkeypatch.setattr(bb_weights, "CONFIG_DIR", configs)
    base = tiny_net_config()
    nets = {SDXL_NAME: dataclasses.replace(base, lq=dataclasses.replace(base.lq, latent_channels=4)), QWEN_NAME: base}
    root = tmp_path / "weights"
    for name, net in nets.items():
        monkeypatch.setitem(presets.PRESETS, name, dataclasses.replace(presets.PRESETS[name], net=net))
        torch.manual_seed(7)
        from pid_decoder import PiDNet

        state = {"net." + k: v.detach().bfloat16() for k, v in PiDNet(net).state_dict().items()}
        (root / "checkpoints" / name).mkdir(parents=True)
        torch.save(state, root / "checkpoints" / name / "model_ema_bf16.pth")
    torch.manual_seed(3)
    sdxl = diffusers.AutoencoderKL.from_config(json.loads((configs / "sdxl_vae.json").read_text())).eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sdxl.state_dict().items()}, root / "checkpoints" / "sdxl_vae.safetensors")
    qwen = tiny_qwen_vae(seed=5)
    torch.save(state_3d_to_2d(qwen.state_dict(), 1), root / "checkpoints" / "QwenImage_VAE_2d.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_network(monkeypatch)
    return {"root": root, "sdxl": sdxl, "qwen": qwen}


@pytest.mark.parametrize("preset", ["sdxl-4k", "qwenimage-4k"])
def test_reference_layout_runs_offline(reference_folder, preset):
    from pid_decoder import PiDPipeline

    files = weights.check_run_files(preset, weights_dir=reference_folder["root"])
    assert files.backbone.parent.name == "checkpoints" and files.offline
    pipe = PiDPipeline.from_pretrained(preset, weights_dir=reference_folder["root"], device="cpu")
    emb = torch.randn(TEXT_T, TEXT_D, generator=torch.Generator().manual_seed(1))
    out = pipe.upscale(random_image(16, 16), text_embedding=emb, steps=1)[0]
    assert out.size == (64, 64)
    z = torch.randn(1, pipe.backbone.latent_channels, 2, 2, generator=torch.Generator().manual_seed(2))
    vae = reference_folder["sdxl" if preset == "sdxl-4k" else "qwen"]
    with torch.no_grad():  # the file's weights, not fresh ones: same decode as the original VAE
        if preset == "sdxl-4k":
            expected = vae.decode(z / 0.13025).sample
        else:
            expected = vae.decode((z * pipe.backbone.std + pipe.backbone.mean)[:, :, None]).sample[:, :, 0]
        torch.testing.assert_close(pipe.backbone.decode(z), expected.clamp(-1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["sdxl-4k", "qwenimage-4k"])
def test_reference_layout_runs_offline_from_the_cli(reference_folder, tmp_path, preset, capsys):
    from pid_decoder.cli import main
    from pid_decoder.text import save_text_embedding

    random_image(16, 16).save(tmp_path / "photo.png")
    emb = save_text_embedding(tmp_path / "emb.safetensors", torch.randn(TEXT_T, TEXT_D), prompt="", encoder="test")
    out = tmp_path / "out.png"
    code = main(["upscale", str(tmp_path / "photo.png"), "--preset", preset, "--weights-dir",
                 str(reference_folder["root"]), "--text-embedding", str(emb), "--steps", "1", "--device", "cpu",
                 "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_qwen_2d_names_follow_the_spec():
    from pid_decoder.backbones.qwenimage import name_2d

    R = 2  # the released Qwen-Image VAE
    pairs = {
        "encoder.conv_in.weight": "encoder.conv1.weight",
        "encoder.down_blocks.4.norm1.gamma": "encoder.downsamples.4.residual.0.gamma",
        "encoder.down_blocks.3.conv_shortcut.bias": "encoder.downsamples.3.shortcut.bias",
        "encoder.down_blocks.2.resample.1.weight": "encoder.downsamples.2.resample.1.weight",
        "encoder.mid_block.attentions.0.to_qkv.weight": "encoder.middle.1.to_qkv.weight",
        "decoder.mid_block.resnets.1.conv2.weight": "decoder.middle.2.residual.6.weight",
        "encoder.norm_out.gamma": "encoder.head.0.gamma",
        "decoder.conv_out.bias": "decoder.head.2.bias",
        "quant_conv.weight": "conv1.weight",
        "post_quant_conv.bias": "conv2.bias",
        "decoder.up_blocks.1.resnets.2.norm2.gamma": "decoder.upsamples.6.residual.3.gamma",
        "decoder.up_blocks.1.upsamplers.0.resample.1.weight": "decoder.upsamples.7.resample.1.weight",
        "decoder.up_blocks.3.resnets.0.conv1.bias": "decoder.upsamples.12.residual.2.bias",
    }
    for key3, key2 in pairs.items():
        assert name_2d(key3, R) == key2, key3
    assert name_2d("decoder.up_blocks.0.upsamplers.0.time_conv.weight", R) is None


def test_qwen_2d_round_trip_is_exact_for_images():
    from pid_decoder.backbones.qwenimage import state_2d_to_3d, state_3d_to_2d

    vae = tiny_qwen_vae(seed=1)
    state3 = vae.state_dict()
    state2 = state_3d_to_2d(state3, 1)
    assert len(state2) == len([k for k in state3 if "time_conv" not in k])
    torch.testing.assert_close(state2["encoder.downsamples.0.residual.2.weight"],
                               state3["encoder.down_blocks.0.conv1.weight"][:, :, -1], atol=0, rtol=0)
    assert state2["encoder.downsamples.0.residual.0.gamma"].shape == (8, 1, 1)
    back = tiny_qwen_vae(seed=2)
    back.load_state_dict(state_2d_to_3d(state2, back), strict=True)
    torch.testing.assert_close(state_3d_to_2d(back.state_dict(), 1), state2, atol=0, rtol=0)
    x = torch.rand(1, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode(), atol=1e-6, rtol=0)
        z = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(back.decode(z).sample, vae.decode(z).sample, atol=1e-6, rtol=0)


def test_qwen_2d_file_with_wrong_keys_names_them(tmp_path):
    from pid_decoder.backbones import load_backbone
    from pid_decoder.backbones.qwenimage import state_3d_to_2d

    state = state_3d_to_2d(tiny_qwen_vae().state_dict(), 1)
    del state["decoder.head.2.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "QwenImage_VAE_2d.pth")
    cfg = {"_class_name": "AutoencoderKLQwenImage", **json.loads(
        (Path(weights.__file__).parent / "backbones" / "configs" / "qwenimage_vae.json").read_text()), **QWEN_TINY}
    with pytest.raises(ValueError, match=r"QwenImage_VAE_2d.pth.*missing keys: decoder.head.2.bias.*unexpected keys: decoder.extra.weight"):
        load_backbone("qwenimage", tmp_path / "QwenImage_VAE_2d.pth", config=cfg)


# --------------------------------------------------------------------------- bad checkpoint files
@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


class Evil:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_random_bytes_pth_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(bytes([7, 201, 33, 90, 0, 1, 2, 3] * 20))
    with pytest.raises(ValueError, match=r"model.pth is not a torch checkpoint \(it looks like unknown bytes") as info:
        open_checkpoint(path)
    assert "unpickling" not in str(info.value) and ".safetensors" in str(info.value)


def test_png_given_to_info_says_png(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    with pytest.raises(ValueError, match=r"photo.png is not a torch checkpoint \(it looks like a PNG image\)") as info:
        describe(path)
    assert "unpickling" not in str(info.value)


def test_empty_pth(tmp_path):
    (tmp_path / "model_ema_bf16.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"model_ema_bf16.pth.*is empty \(0 bytes\).*fetch it again"):
        open_checkpoint(tmp_path / "model_ema_bf16.pth")


def test_directory_as_checkpoint_names_the_file_inside(tmp_path):
    folder = tmp_path / "PiD_res2k_sr4x_official_flux_distill_4step"
    save_tiny_checkpoint(folder / "model_ema_bf16.pth")
    with pytest.raises(ValueError, match=r"is a directory; pass the .pth/.safetensors file inside it \(found: model_ema_bf16.pth\)"):
        load_network(folder)


def test_unreadable_checkpoint_is_a_permission_error(tmp_path, monkeypatch):
    path = save_tiny_checkpoint(tmp_path / "locked.pth")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make open() answer as it would for a user
        import builtins

        real_open = builtins.open

        def guarded(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(PermissionError, match=r"cannot read checkpoint .*locked.pth.*permission denied"):
        open_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    full = save_tiny_checkpoint(tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut.pth is truncated or corrupt"):
        open_checkpoint(tmp_path / "cut.pth")


def test_pickle_protocol_warning_does_not_leak(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "p4.pth", pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"saved with pickle protocol 4.*re-save it with torch.save"):
            open_checkpoint(tmp_path / "p4.pth")


def test_plain_pickle_never_runs(tmp_path, marker):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil(marker), protocol=2))
    with pytest.raises(ValueError, match="plain Python pickle.*unpickling can run code"):
        open_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_code_in_a_torch_file_never_runs(tmp_path, marker):
    torch.save({"w": torch.zeros(1), "x": Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refusing to load .*arbitrary Python unpickling.*GLOBAL"):
        load_network(tmp_path / "evil.pth")
    assert not marker.exists()


def test_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "weights.pth", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="weights.pth is a zip archive but not a torch checkpoint"):
        open_checkpoint(tmp_path / "weights.pth")


@pytest.mark.parametrize(
    "content, looks",
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer.*git lfs pull"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML/XML page"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG image"),
    ],
)
def test_common_wrong_downloads_are_named(tmp_path, content, looks):
    (tmp_path / "model_ema_bf16.pth").write_bytes(content)
    with pytest.raises(ValueError, match=f"not a torch checkpoint \\(it looks like .*{looks}"):
        open_checkpoint(tmp_path / "model_ema_bf16.pth")


def test_png_named_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(PNG)
    with pytest.raises(ValueError, match=r"not a valid safetensors file \(it looks like a PNG image\)"):
        open_checkpoint(tmp_path / "model.safetensors")


def test_safetensors_with_bad_stored_config(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "net.safetensors", metadata={"config": "{not json"})
    with pytest.raises(ValueError, match=r"config stored in its metadata is not valid.*--config FILE / config="):
        load_network(tmp_path / "net.safetensors")


def test_backbone_weight_file_that_is_an_image(tmp_path):
    from pid_decoder.backbones import load_backbone

    (tmp_path / "sdxl_vae.safetensors").write_bytes(PNG)
    with pytest.raises(ValueError, match=r"backbone 'sdxl'.*sdxl_vae.safetensors.*it looks like a PNG image.*It needs"):
        load_backbone("sdxl", tmp_path / "sdxl_vae.safetensors")


def test_backbone_weight_file_that_is_empty(tmp_path):
    from pid_decoder.backbones import load_backbone

    (tmp_path / "ae.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ae.safetensors.*is empty \(0 bytes\).*It needs"):
        load_backbone("flux", tmp_path / "ae.safetensors")


# --------------------------------------------------------------------------- configs, devices, dtypes
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model_ema_bf16.pth")


def test_config_json_path_is_accepted(tmp_path, tiny_ckpt):
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"net": dataclasses.asdict(tiny_net_config())}))
    net = load_network(tiny_ckpt, config=str(path))
    assert net.config == tiny_net_config()
    assert load_network(tiny_ckpt, config=tiny_net_config().to_dict()).config == tiny_net_config()


@pytest.mark.parametrize(
    "content, error, message",
    [
        ("{\"hidden_size\": 32,", ValueError, r"x.json' is not valid JSON: .* line 1"),
        ("[1, 2]", ValueError, r"must hold a JSON object of network arguments, got a list"),
        ("{\"hidden_sise\": 32}", ValueError, r"not a valid network config: unknown NetConfig fields: \['hidden_sise'\]"),
        ("{\"hidden_size\": \"32\"}", ValueError, r"NetConfig.hidden_size must be an int, got str '32'"),
        ("{\"lq\": 5}", ValueError, r"lq must be an object of LQConfig fields"),
    ],
)
def test_bad_config_file_says_what_is_wrong(tmp_path, tiny_ckpt, content, error, message):
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(error, match=message):
        load_network(tiny_ckpt, config=tmp_path / "x.json")


def test_missing_config_file(tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.json' does not exist.*--config FILE / config="):
        load_network(tiny_ckpt, config=tmp_path / "nope.json")


def test_config_of_the_wrong_kind():
    with pytest.raises(TypeError, match="config must be a NetConfig, a dict or the path of a JSON file, got int"):
        load_net_config(5)


def test_weight_file_given_as_config(tiny_ckpt):
    with pytest.raises(ValueError, match="not a UTF-8 text file.*--config takes a JSON file"):
        load_net_config(tiny_ckpt)


def test_cuda_without_cuda_is_a_value_error(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' requested but CUDA is not available.*Available devices: cpu.*--device cpu"):
        load_network(tiny_ckpt, tiny_net_config(), device="cuda")


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: this machine has 1 CUDA device.*cuda:0"):
        check_device("cuda:3")


@pytest.mark.parametrize("device", ["tpu", "", "gpu0"])
def test_unknown_device_names(device):
    with pytest.raises(ValueError, match=r"unknown device .*use one of cpu"):
        check_device(device)


def test_unknown_dtype(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown dtype 'int8'; use one of fp32, bf16, fp16"):
        load_network(tiny_ckpt, tiny_net_config(), dtype="int8")


def test_unrecognised_network_names_cli_and_api(tmp_path):
    torch.save({"s_embedder.proj.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"--config FILE.json on the command line, config= in the API"):
        load_network(tmp_path / "other.pth")


# --------------------------------------------------------------------------- text embedding files
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda p: p.mkdir(), ValueError, r"is a directory"),
        (lambda p: p.write_bytes(b""), ValueError, r"is empty \(0 bytes\)"),
        (lambda p: p.write_bytes(PNG), ValueError, r"not a readable safetensors file \(it looks like a PNG image\).*pid-decoder embed"),
    ],
)
def test_bad_text_embedding_files(tmp_path, make, error, message):
    path = tmp_path / "emb.safetensors"
    make(path)
    with pytest.raises(error, match=message) as info:
        load_text_embedding(path)
    assert "emb.safetensors" in str(info.value)


def test_text_embedding_of_the_wrong_type():
    with pytest.raises(TypeError, match="text embedding must be the path of a .safetensors file, got Tensor"):
        load_text_embedding(torch.zeros(3))


def test_checkpoint_bytes_in_memory_are_refused_with_a_type_error():
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        ck.check_weight_path(io.BytesIO(b"x"))


def test_backbone_and_text_encoder_devices_are_checked_first(monkeypatch, tmp_path):
    from pid_decoder.backbones import load_backbone

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' requested but CUDA is not available.*Available devices: cpu"):
        load_backbone("flux", tmp_path / "ae.safetensors", device="cuda")
    with pytest.raises(ValueError, match=r"device 'cuda:1' requested but CUDA is not available.*Available devices: cpu"):
        TextEncoder(tmp_path / "gemma", device="cuda:1")


def test_text_encoder_without_network_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    probes = []

    def unreachable(repo, filename):
        probes.append(repo)
        raise weights.HubUnreachable("http://127.0.0.1:9: ConnectError: refused")

    def never(*args, **kwargs):
        raise AssertionError("transformers was asked to load (and would retry the hub for minutes)")

    monkeypatch.setattr(weights, "_hub_probe", unreachable)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", never)
    start = time.monotonic()
    with pytest.raises(MissingTextEncoderError, match=r"could not be reached .*refused.*not in the local Hugging Face cache"):
        TextEncoder("org/gemma-like", cache_dir=False).encode("a cat")
    assert probes == ["org/gemma-like"] and time.monotonic() - start < 5.0


def test_vae_from_the_hub_without_network_uses_the_cache_only(monkeypatch):
    from pid_decoder.backbones import load_backbone

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_hub_probe", lambda repo, f: (_ for _ in ()).throw(weights.HubUnreachable("refused")))
    seen = {}

    def from_pretrained(repo, **kwargs):
        seen.update(kwargs, repo=repo)
        raise OSError(f"{repo} is not in the cache")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", from_pretrained)
    with pytest.raises(FileNotFoundError, match=r"could not load the sdxl VAE from stabilityai/stable-diffusion-xl-base-1.0/vae.*Pass path="):
        load_backbone("sdxl")
    assert seen["local_files_only"] is True  # no download attempts (and no retries) once the hub proved unreachable


def test_config_field_types_are_named():
    from pid_decoder.config import SamplerConfig

    with pytest.raises(ValueError, match=r"LQConfig.latent_channels must be an int, got float 16.0"):
        load_net_config({"lq": {"latent_channels": 16.0}})
    with pytest.raises(TypeError, match=r"SamplerConfig.steps must be an int, got float 2.5"):
        SamplerConfig(steps=2.5)
    with pytest.raises(ValueError, match=r"NetConfig.use_text_rope must be a bool, got int 1"):
        load_net_config({"use_text_rope": 1})
