"""The PiD network: torch only, no I/O, no diffusers/transformers."""

from .net import PiDNet

__all__ = ["PiDNet"]
