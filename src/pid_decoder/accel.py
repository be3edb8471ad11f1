"""Optional accelerations, each opt-in and each giving the same image as the plain path.

- `compile_network`: ``torch.compile`` of the patch and pixel blocks (regional compilation).
- `CudaGraphDenoiser` / `sample_cuda_graph`: ``net.denoise`` captured once per (batch, size, chunk) as a CUDA
  graph and replayed at every step (and for every later image of the same size).
- `enable_sequential_offload`: block weights stay in (pinned) CPU memory and visit the compute device one
  block at a time, so a GPU smaller than the weights can decode.

Legend: B batch, H/W output pixels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .model.net import Conditioning, PiDNet, Window
from .sampling import StepCallback, _initial_noise, _resolve_chunk, student_loop

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- compile
def compile_network(net: PiDNet, **compile_kwargs: Any) -> PiDNet:
    """Compile every patch block and pixel block in place (``nn.Module.compile``); returns ``net``.

    Regional compilation: the blocks of one class share one compiled graph (parameters are graph inputs), so
    compile time does not grow with depth, and the wiring in `PiDNet.denoise` stays eager. The state dict,
    hooks and parameters are unchanged. Defaults to ``dynamic=False``: each new resolution (and pixel-path
    chunk) compiles once on first use and is cached by dynamo's guards; a process that decodes many different
    sizes may reach dynamo's recompile limit (``torch._dynamo.config.recompile_limit``, 8 per block class) and
    then falls back to eager for new sizes. ``compile_kwargs`` go to ``torch.compile`` (``mode=``, ``backend=``,
    ``dynamic=``...). First calls at a new size are slow (seconds to minutes); later ones are faster.
    """
    kwargs = {"dynamic": False, **compile_kwargs}
    blocks = [*net.patch_blocks, *net.pixel_blocks]
    for block in blocks:
        block.compile(**kwargs)
    log.info("compiled %d blocks with %s", len(blocks), kwargs)
    return net


# ----------------------------------------------------------------------------------------- CUDA graphs
def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


def _pair_tensors(a: Any, b: Any, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    if torch.is_tensor(a):
        fn(a, b)
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _pair_tensors(x, y, fn)


class CudaGraphDenoiser:
    """``net.denoise(x, t, cond, chunk)`` captured as a CUDA graph for one input shape and conditioning shape.

    Call it as ``v = denoiser(x, t)`` (the `sampling.Denoiser` convention, so it drops into `student_loop`):
    the inputs are copied into the graph's static buffers, the graph is replayed (one launch for the whole
    network), and a copy of the static output is returned. `update` swaps in the conditioning of another
    image of the same size without recapturing. The graph keeps its own copy of the conditioning and a
    private memory pool holding every intermediate (as much as one eager step at its peak) for its lifetime.
    """

    def __init__(
        self,
        net: PiDNet,
        cond: Conditioning,
        x_example: torch.Tensor,
        t_example: torch.Tensor,
        *,
        chunk: int | None = None,
        warmup: int = 2,
    ) -> None:
        if x_example.device.type != "cuda" or net.device.type != "cuda":
            raise ValueError(
                f"CUDA graphs need the network and inputs on a CUDA device, got net on {net.device} and x on "
                f"{x_example.device}; use the plain sampler on other devices"
            )
        self.net, self.chunk = net, chunk
        with torch.inference_mode():
            self.cond = dataclasses.replace(
                cond, **{f.name: _map_tensors(getattr(cond, f.name), torch.clone) for f in dataclasses.fields(cond)}
            )
            self.x = x_example.detach().to(torch.float32).clone()  # (B, 3, H, W) static input
            self.t = t_example.detach().to(torch.float32).expand(x_example.shape[0]).clone()  # (B,)
            # Warm up on a side stream (lazy initialisation, cached tables, autotuning) before capturing.
            stream = torch.cuda.Stream(device=self.x.device)
            stream.wait_stream(torch.cuda.current_stream(self.x.device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    net.denoise(self.x, self.t, self.cond, chunk=chunk)
            torch.cuda.current_stream(self.x.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = net.denoise(self.x, self.t, self.cond, chunk=chunk)  # (B, 3, H, W) static output
        log.info("captured a CUDA graph for denoise at %s (chunk %s)", tuple(self.x.shape), chunk)

    @torch.inference_mode()
    def update(self, cond: Conditioning) -> None:
        """Copy another image's conditioning (same batch, size and text length) into the graph's buffers."""
        for f in dataclasses.fields(cond):
            mine, theirs = getattr(self.cond, f.name), getattr(cond, f.name)
            if (mine is None) != (theirs is None):
                raise ValueError(f"conditioning field {f.name!r} is {theirs!r}; the captured graph has {mine!r}")

            def check_copy(dst: torch.Tensor, src: torch.Tensor, name: str = f.name) -> None:
                if dst.shape != src.shape:
                    raise ValueError(
                        f"conditioning {name} has shape {tuple(src.shape)}, the captured graph expects "
                        f"{tuple(dst.shape)}: capture a new graph for this size or text length"
                    )
                dst.copy_(src)

            if torch.is_tensor(mine) or isinstance(mine, (list, tuple)):
                _pair_tensors(mine, theirs, check_copy)
            elif mine != theirs:
                raise ValueError(f"conditioning {f.name} is {theirs}, the captured graph has {mine}")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape != self.x.shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, the captured graph expects {tuple(self.x.shape)}")
        self.x.copy_(x)
        self.t.copy_(t.expand_as(self.t))
        self.graph.replay()
        return self.out.clone()


GraphCache = dict[tuple, CudaGraphDenoiser]  # (batch, height, width, text length, chunk, window) -> graph


@torch.inference_mode()
def sample_cuda_graph(
    net: PiDNet,
    lq_latent: torch.Tensor,
    text: torch.Tensor,
    degrade_sigma: torch.Tensor | float,
    *,
    height: int,
    width: int,
    steps: int = 4,
    mode: str = "sde",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    step_noise: Sequence[torch.Tensor] | None = None,
    clamp: bool = True,
    chunk: int | None = None,
    max_memory: int | str | None = None,
    callback: StepCallback | None = None,
    window: Window | None = None,
    graphs: GraphCache | None = None,
) -> torch.Tensor:
    """`sampling.sample` with the network step replayed from a CUDA graph (same arguments, same image).

    ``graphs``: a dict the caller keeps between calls; images with the same batch, size, text length and
    chunk reuse the captured graph (capture costs about ``warmup + 1`` network evaluations). Without it, a
    graph is captured for this call only, which pays off only for many steps.
    """
    if net.config.lq is None:
        raise ValueError("sample_cuda_graph() is the PiD student sampler; PixelDiT has no latent input")
    if mode not in ("sde", "ode"):
        raise ValueError(f"mode must be 'sde' or 'ode', got {mode!r}")
    cond = net.prepare(text, lq_latent, degrade_sigma, height, width, window=window)
    chunk = _resolve_chunk(net, cond, chunk, max_memory)
    shape = (cond.batch, net.config.in_channels, height, width)
    x = _initial_noise(noise, shape, generator, net.device)
    graphs = {} if graphs is None else graphs
    key = (cond.batch, height, width, cond.text.shape[1], chunk, window)
    denoiser = graphs.get(key)
    if denoiser is None:
        t0 = torch.full((cond.batch,), 1000.0, dtype=torch.float32, device=x.device)
        denoiser = graphs[key] = CudaGraphDenoiser(net, cond, x, t0, chunk=chunk)
    else:
        denoiser.update(cond)
    return student_loop(denoiser, x, steps, mode=mode, generator=generator, step_noise=step_noise, clamp=clamp,
                        callback=callback)


# ------------------------------------------------------------------------------------------- offload
class SequentialOffload:
    """Handle returned by `enable_sequential_offload`: counters, the loaded set, and `remove()`."""

    def __init__(self, net: PiDNet, device: torch.device) -> None:
        self.net, self.device = net, device
        self.loads = self.unloads = 0
        self.loaded: set[nn.Module] = set()
        self._stored: dict[nn.Module, list[tuple[nn.Module, str, bool, torch.Tensor]]] = {}
        self._handles = []

    def _store(self, block: nn.Module) -> None:
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        entries = []
        for mod in block.modules():
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    stored = tensor.detach().to("cpu")
                    stored = stored.pin_memory() if pin else stored
                    entries.append((mod, name, is_param, stored))
                    _assign(mod, name, is_param, stored)
        self._stored[block] = entries
        self._handles.append(block.register_forward_pre_hook(self._load))
        self._handles.append(block.register_forward_hook(self._unload))

    def _load(self, block: nn.Module, args: Any) -> None:
        for mod, name, is_param, stored in self._stored[block]:
            _assign(mod, name, is_param, stored.to(self.device, non_blocking=True))
        self.loaded.add(block)
        self.loads += 1

    def _unload(self, block: nn.Module, args: Any, output: Any) -> None:
        # The weights are never written, so the stored copy is still valid: drop the device copy, no transfer.
        for mod, name, is_param, stored in self._stored[block]:
            _assign(mod, name, is_param, stored)
        self.loaded.discard(block)
        self.unloads += 1

    def remove(self) -> None:
        """Remove the hooks; the blocks stay in CPU memory (``net.to(device)`` to bring them back)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _assign(mod: nn.Module, name: str, is_param: bool, tensor: torch.Tensor) -> None:
    if is_param:
        mod._parameters[name].data = tensor
    else:
        mod._buffers[name] = tensor


def enable_sequential_offload(net: PiDNet, device: torch.device | str) -> SequentialOffload:
    """Keep the patch and pixel blocks in CPU memory (pinned for CUDA) and run them on ``device`` one at a time.

    A forward pre-hook copies a block's weights to ``device`` just before it runs and a forward hook drops
    the copy right after (the CPU copy is kept, so nothing is copied back). Everything else (embedders, LQ
    projection and gates, final layer: a few percent of the weights) moves to ``device`` and stays there, so
    ``net.device`` is ``device`` and `PiDNet.prepare` builds the conditioning there: `sample(net, ...)` and
    the other samplers work unchanged. Device memory then holds the resident modules, one block's weights and
    the activations. Each step copies all block weights to the device once (2.5 GB in bf16 for the full
    model), so this trades speed for memory; no prefetching is done. Returns a handle (`remove()` undoes the
    hooks). Do not combine with `compile_network` or CUDA graphs.
    """
    device = torch.device(device)
    offload = SequentialOffload(net, device)
    blocks = [*net.patch_blocks, *net.pixel_blocks]
    in_blocks = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    resident = 0
    for mod in net.modules():
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in in_blocks:
                    _assign(mod, name, is_param, tensor.detach().to(device))
                    resident += tensor.numel() * tensor.element_size()
    for block in blocks:
        offload._store(block)
    offloaded = sum(s.numel() * s.element_size() for entries in offload._stored.values() for *_, s in entries)
    log.info("sequential offload to %s: %.1f MB resident, %.1f MB in %d offloaded blocks",
             device, resident / 2**20, offloaded / 2**20, len(blocks))
    return offload
