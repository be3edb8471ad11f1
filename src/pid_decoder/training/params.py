"""Which parameters train (training-details.md §4.1-§4.2).

- ``"fix_backbone"`` (the released v1.5 teachers): only the LQ projection (``lq_proj.*``: trunk, output
  heads, PiT head, gates, aux RGB head) and the PiT LQ gate (``pit_lq_gate.*``); the PixelDiT backbone is frozen.
- ``"full"``: every parameter the loss reaches. The last patch block's text-output path (``attn.proj_y``,
  ``norm_y2``, ``mlp_y``) is frozen as the reference freezes it, and so is its ``attn.q_norm_y``: the text
  queries of the last block are dead, so its gradient is exactly zero in the reference and absent here
  (our last block does not compute them). Leaving it trainable would give DDP a parameter without a gradient.
"""

from __future__ import annotations

from torch import nn

MODES = ("fix_backbone", "full")
LQ_PREFIXES = ("lq_proj.", "pit_lq_gate.")


def unused_by_loss(net: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the parameters no training loss reaches (the last block's text output path)."""
    last = f"patch_blocks.{net.config.patch_depth - 1}."
    return tuple(last + part for part in ("attn.proj_y.", "norm_y2.", "mlp_y.", "attn.q_norm_y."))


def trainable_names(net: nn.Module, mode: str) -> list[str]:
    """Names of the parameters that train in ``mode`` ("fix_backbone" or "full"), in module order."""
    if mode not in MODES:
        raise ValueError(f"unknown trainable-parameter mode {mode!r}; valid modes: {', '.join(MODES)}")
    names = [name for name, _ in net.named_parameters()]
    if mode == "fix_backbone":
        if getattr(net.config, "lq", None) is None:
            raise ValueError(
                "mode 'fix_backbone' trains only the LQ projection, but this network is the text-to-image PixelDiT "
                "(no LQ branch); use mode 'full' for the stage-0 finetune"
            )
        return [n for n in names if n.startswith(LQ_PREFIXES)]
    frozen = unused_by_loss(net)
    return [n for n in names if not n.startswith(frozen)]


def set_trainable(net: nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for ``mode`` ("fix_backbone" or "full") and return the trainable names.

    Call it before building the optimizer and before wrapping the network (DDP/FSDP).
    """
    names = set(trainable_names(net, mode))
    for name, param in net.named_parameters():
        param.requires_grad_(name in names)
    return [n for n, _ in net.named_parameters() if n in names]
