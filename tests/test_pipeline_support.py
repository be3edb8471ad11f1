"""Tiny stand-ins shared by the pipeline / CLI / distributed tests (no tests here).

A tiny PiD checkpoint in the release layout, a tiny FLUX.1-style AutoencoderKL saved as a diffusers folder,
a text-embedding file instead of Gemma, a tiny FluxPipeline whose prompt encoder returns fixed random
embeddings, and a fake hub for the weight downloads. Everything is built in tmp folders; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

TINY_PRESET = "PiD_tiny_test_flux_distill_4step"
TINY_ALIAS = "tiny-flux"
TEXT_T, TEXT_D = 8, 24

KL_TINY = {
    "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def tiny_net_config():
    from pid_decoder.config import LQConfig, NetConfig

    return NetConfig(
        hidden_size=32, num_groups=2, patch_depth=2, pixel_hidden_size=4, pixel_attn_hidden_size=16,
        pixel_num_groups=2, pixel_depth=1, txt_embed_dim=TEXT_D, txt_max_length=TEXT_T, rope_ref_h=512,
        rope_ref_w=512,
        lq=LQConfig(latent_channels=16, hidden_dim=8, num_res_blocks=1, padding_mode="replicate",
                    gate_type="sigma_aware_per_token", pit_inject=True),
    )


def tiny_preset(kind: str = "student"):
    from pid_decoder.config import SamplerConfig
    from pid_decoder.presets import Preset

    if kind == "student":
        sampler, name, alias = SamplerConfig(kind="student", steps=4, mode="sde"), TINY_PRESET, TINY_ALIAS
    else:
        sampler = SamplerConfig(kind="teacher", steps=2, cfg_scale=3.0, base_shift=6.0, base_size=2048)
        name, alias = "PiD_tiny_test_flux_undistilled", "tiny-flux-teacher"
    return Preset(name, alias, tiny_net_config(), "flux", sampler, "tiny", "tiny test preset")


def register_presets(monkeypatch) -> None:
    from pid_decoder import presets

    for p in (tiny_preset("student"), tiny_preset("teacher")):
        monkeypatch.setitem(presets.PRESETS, p.name, p)
        monkeypatch.setitem(presets.ALIASES, p.alias, p.name)


def save_tiny_checkpoint(path: Path, seed: int = 1234) -> Path:
    """A released-style ``model_ema_bf16.pth``: ``net.``-prefixed bf16 tensors."""
    from pid_decoder import PiDNet

    torch.manual_seed(seed)
    net = PiDNet(tiny_net_config())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net." + k: v.detach().bfloat16() for k, v in net.state_dict().items()}, path)
    return path


def save_tiny_vae(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**KL_TINY).eval().save_pretrained(folder)
    return folder


def save_text_embedding_file(path: Path, seed: int = 3) -> Path:
    from pid_decoder.text import save_text_embedding

    g = torch.Generator().manual_seed(seed)
    return save_text_embedding(path, torch.randn(TEXT_T, TEXT_D, generator=g), prompt="tiny", encoder="test")


def make_assets(root: Path) -> dict[str, Path]:
    """Everything a tiny end-to-end run needs, under ``root``."""
    from pid_decoder.presets import CHECKPOINT_FILE

    weights = root / "weights"
    ckpt = save_tiny_checkpoint(weights / "checkpoints" / TINY_PRESET / CHECKPOINT_FILE)
    teacher = weights / "checkpoints" / "PiD_tiny_test_flux_undistilled" / CHECKPOINT_FILE
    teacher.parent.mkdir(parents=True)
    shutil.copy(ckpt, teacher)
    config = root / "tiny_config.json"
    config.write_text(json.dumps(dataclasses.asdict(tiny_net_config())))
    return {
        "weights": weights,
        "checkpoint": ckpt,
        "config": config,
        "vae": save_tiny_vae(root / "tiny_vae"),
        "embedding": save_text_embedding_file(root / "emb.safetensors"),
    }


def load_tiny_net(path: Path):
    from pid_decoder.checkpoints import load_network

    return load_network(path, tiny_net_config(), dtype=torch.float32, device="cpu")


def random_image(w: int, h: int, seed: int = 0, mode: str = "RGB"):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, size=(h, w), dtype=np.uint16))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


# --------------------------------------------------------------------------- tiny LDM
def tiny_flux_pipeline(vae=None):
    """A FluxPipeline with a 1+1-layer transformer and a prompt encoder that needs no tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    class TinyFluxPipeline(FluxPipeline):
        def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                          pooled_prompt_embeds=None, max_sequence_length=512, lora_scale=None):
            n = (1 if isinstance(prompt, str) else len(prompt)) * num_images_per_prompt
            g = torch.Generator().manual_seed(len(prompt if isinstance(prompt, str) else prompt[0]))
            embeds = torch.randn(n, 8, 32, generator=g).to(device)
            pooled = torch.randn(n, 32, generator=g).to(device)
            return embeds, pooled, torch.zeros(8, 3, device=device)

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    )
    if vae is None:
        vae = AutoencoderKL(**KL_TINY).eval()
    pipe = TinyFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- fake hub
class FakeHub:
    """Stands in for `huggingface_hub.hf_hub_download`: serves files from ``root/<repo>/<filename>``."""

    def __init__(self, root: Path):
        self.root = root
        self.calls: list[tuple[str, str, bool]] = []

    def add(self, repo: str, filename: str, source: Path) -> None:
        target = self.root / repo / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)

    def __call__(self, repo, filename, *, local_dir, local_files_only):
        self.calls.append((repo, filename, local_files_only))
        if local_files_only:
            raise FileNotFoundError(f"{repo}/{filename} is not in the local cache (offline)")
        source = self.root / repo / filename
        if not source.is_file():
            raise FileNotFoundError(f"404: {repo}/{filename}")
        target = Path(local_dir) / filename if local_dir is not None else self.root / ".cache" / repo / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)
