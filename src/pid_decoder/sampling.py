"""Samplers: the distilled few-step student and the undistilled DPM-Solver++ teacher. Pure functions.

Conventions (flow matching): t in [0, 1], t = 1 is noise; ``x_t = (1 - t) x0 + t eps``; the network
predicts the velocity ``v = eps - x0`` and receives ``t * 1000``. Images are (B, 3, H, W) in [-1, 1].

Randomness: every draw comes from the caller's ``torch.Generator`` (on the generator's device, then moved),
in the reference's order and shapes, so a CPU generator seeded with S gives the same image on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .model.memory import choose_chunk
from .model.net import Conditioning, PiDNet, Window

STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
TIMESCALE = 1000.0

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def check_steps(steps: object, max_steps: int | None = None, name: str = "steps") -> int:
    """``steps`` as an int: a whole number >= 1 (and <= ``max_steps`` when given), else TypeError/ValueError."""
    import numbers

    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"{name} must be a whole number of sampler steps, got {steps!r} ({type(steps).__name__})")
    steps = int(steps)
    if max_steps is not None and not 1 <= steps <= max_steps:
        raise ValueError(
            f"{name} must be in 1..{max_steps} for the distilled student (its schedule has {max_steps} steps: "
            f"t = {', '.join(f'{t:g}' for t in STUDENT_T_LIST)}), got {steps}"
        )
    if steps < 1:
        raise ValueError(f"{name} must be >= 1, got {steps}")
    return steps


def student_t_list(steps: int, t_list: Sequence[float] = STUDENT_T_LIST) -> torch.Tensor:
    """The student's time points for ``steps`` steps (float32, ending at 0).

    One step uses t = 1.0; otherwise the points are picked from ``t_list`` at indices
    ``round(linspace(0, len - 1, steps + 1))`` (round half to even), duplicates kept. This is the reference's
    rule for any ``steps``; the samplers refuse more steps than the schedule has (they would repeat time points).
    """
    steps = check_steps(steps)
    if steps == 1:
        # parity: the reference's one-step path uses t = 1.0, not the list's 0.999.
        return torch.tensor([1.0, 0.0], dtype=torch.float32)
    base = torch.tensor(list(t_list), dtype=torch.float32)
    if steps == len(base) - 1:
        return base
    index = torch.round(torch.linspace(0, len(base) - 1, steps + 1)).long()
    return base[index]


def dynamic_shift(height: int, width: int, base_shift: float = 6.0, base_size: int = 2048) -> float:
    """Teacher shift ``base_shift * sqrt(sqrt(H * W) / base_size)`` (6.0 at 2048x2048)."""
    return base_shift * math.sqrt(math.sqrt(height * width) / base_size)


def teacher_time_grid(steps: int, shift: float) -> torch.Tensor:
    """DPM-Solver "time_uniform_flow" grid, float32, from t(s = 0.999) down to exactly 0 (steps + 1 points)."""
    steps = check_steps(steps)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    # parity: float32 arithmetic throughout, as the reference computes it.
    s = 1.0 - torch.linspace(1.0, 0.001, steps + 1)
    return (shift * s / (1 + (shift - 1) * s)).flip(0)


def _draw(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device).to(device)


_X0_BLOCK = 1 << 22  # elements per float64 slice: bounds the temporaries at 4K to ~100 MB


def _x0_from_velocity(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x - t * v``; parity: evaluated in float64 and rounded to float32 (where the device has float64).

    Done in slices of the flattened image so the float64 temporaries stay small at any resolution.
    """
    if x.device.type == "mps":  # MPS has no float64
        return x - t * v
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flat_x, flat_v, flat_out = x.reshape(-1), v.reshape(-1), out.view(-1)
    t64 = t.double()
    for start in range(0, flat_x.numel(), _X0_BLOCK):
        sl = slice(start, start + _X0_BLOCK)
        flat_out[sl] = flat_x[sl].double() - t64 * flat_v[sl].double()
    return out


def _initial_noise(
    noise: torch.Tensor | None, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    if noise is None:
        return _draw(shape, generator, device)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} (B, 3, height, width), got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or infinite values")
    return noise.to(device=device, dtype=torch.float32)


@torch.inference_mode()
def sample(
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
) -> torch.Tensor:
    """Distilled student sampler -> (B, 3, height, width) float32 in [-1, 1].

    Args:
        net: a PiD network (with an LQ branch).
        lq_latent: (B, C, h, w) normalised latent; ``height = h * down * sr`` (same for width).
        text: (B, T, txt_dim) text embedding.
        degrade_sigma: float or (B,) noise level of the latent, in [0, 1].
        steps: 4 for the released students; 1, 2, 3 follow the reference's rule.
        mode: "sde" (re-noise with fresh noise after each step, the default) or "ode" (Euler).
        generator: source of the initial and per-step noise (None: the global RNG on the net's device).
        noise: explicit initial noise (B, 3, H, W); ``step_noise``: explicit per-step noise for "sde".
        clamp: clamp the output to [-1, 1] (the reference always does).
        chunk: patch tokens the pixel pathway processes at once; None = chosen from ``max_memory``.
        max_memory: memory budget for the pixel pathway (bytes or "4GB"); None = from the free device
            memory on CUDA, a cache-friendly chunk on CPU. Every chunk size gives the same result.
        callback: called as ``callback(done, total)`` after each step.
        window: decode only this crop of a larger image (positions and LQ features of the full image;
            ``lq_latent`` is the full latent, ``height``/``width`` the crop size). See `PiDNet.prepare`.
    """
    if net.config.lq is None:
        raise ValueError("sample() is the PiD student sampler; PixelDiT (no latent input) uses sample_teacher()")
    if mode not in ("sde", "ode"):
        raise ValueError(f"mode must be 'sde' or 'ode', got {mode!r}")
    steps = check_steps(steps, len(STUDENT_T_LIST) - 1)
    cond = net.prepare(text, lq_latent, degrade_sigma, height, width, window=window)
    chunk = _resolve_chunk(net, cond, chunk, max_memory)
    shape = (cond.batch, net.config.in_channels, height, width)
    x = _initial_noise(noise, shape, generator, net.device)
    return student_loop(
        lambda x, t: net.denoise(x, t, cond, chunk=chunk), x, steps, mode=mode, generator=generator,
        step_noise=step_noise, clamp=clamp, callback=callback,
    )


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,3,H,W), t*1000 (B,)) -> v (B,3,H,W)


def student_loop(
    denoise: Denoiser,
    x: torch.Tensor,
    steps: int = 4,
    *,
    mode: str = "sde",
    generator: torch.Generator | None = None,
    step_noise: Sequence[torch.Tensor] | None = None,
    clamp: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """The student's update rule around any denoiser (plain, windowed/tiled, compiled...).

    ``x`` is the initial noise; per-step noise is drawn from ``generator`` (or taken from ``step_noise``).
    """
    if mode not in ("sde", "ode"):
        raise ValueError(f"mode must be 'sde' or 'ode', got {mode!r}")
    t_list = student_t_list(check_steps(steps, len(STUDENT_T_LIST) - 1))
    n_draws = sum(1 for t in t_list[1:].tolist() if t > 0)
    if step_noise is not None and mode == "sde" and len(step_noise) < n_draws:
        raise ValueError(f"step_noise must hold {n_draws} tensors for {steps} steps, got {len(step_noise)}")
    device, batch = x.device, x.shape[0]
    # The time points stay 0-dim CPU tensors: device kernels take them as scalars, so the loop never copies
    # to or waits for the device. The network's t (float32 t * 1000) is filled on the device.
    t_net = (t_list * TIMESCALE).tolist()
    total = len(t_list) - 1
    draws = 0
    for i in range(total):
        t_cur, t_next = t_list[i], t_list[i + 1]
        v = denoise(x, torch.full((batch,), t_net[i], dtype=torch.float32, device=device))  # (B, 3, H, W)
        x0 = _x0_from_velocity(x, t_cur, v)
        if t_next.item() > 0:  # CPU tensor: no device sync
            if mode == "sde":
                if step_noise is not None:
                    eps = step_noise[draws].to(device)
                else:
                    eps = _draw(tuple(x.shape), generator, device)
                draws += 1
                x = (1 - t_next) * x0 + t_next * eps
            else:
                x = x + (t_next - t_cur) * v
        else:
            x = x0
        if callback is not None:
            callback(i + 1, total)
    return x.clamp(-1, 1) if clamp else x


def _resolve_chunk(net: PiDNet, cond: Conditioning, chunk: int | None, max_memory, batch_factor: int = 1):
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 patch tokens, got {chunk}")
        return chunk
    ps = net.config.patch_size
    tokens = batch_factor * cond.batch * (cond.height // ps) * (cond.width // ps)
    return choose_chunk(net.config, tokens, net.device, net.dtype, max_memory)


def broadcast_text(text: torch.Tensor, batch: int, name: str = "text") -> torch.Tensor:
    """A (T, D), (1, T, D) or (B, T, D) text embedding as (batch, T, D)."""
    if not torch.is_tensor(text) or text.ndim not in (2, 3):
        raise ValueError(f"{name} must be a (T, D), (1, T, D) or (B, T, D) text embedding tensor")
    if text.ndim == 2:
        text = text[None]
    if text.shape[0] == 1 and batch > 1:
        text = text.expand(batch, -1, -1)
    if text.shape[0] != batch:
        raise ValueError(f"{name} has batch {text.shape[0]}, expected 1 or {batch}")
    return text


@torch.inference_mode()
def sample_teacher(
    net: PiDNet,
    lq_latent: torch.Tensor | None,
    text: torch.Tensor,
    degrade_sigma: torch.Tensor | float | None,
    *,
    negative_text: torch.Tensor | None = None,
    height: int,
    width: int,
    steps: int = 25,
    cfg_scale: float = 5.0,
    shift: float | None = None,
    base_shift: float = 6.0,
    base_size: int = 2048,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    clamp: bool = True,
    chunk: int | None = None,
    max_memory: int | str | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Undistilled teacher sampler (multistep DPM-Solver++, order 2, first-order last step) with
    text-only classifier-free guidance against ``negative_text``.

    ``lq_latent``/``degrade_sigma`` are None for PixelDiT. ``shift=None`` uses the released teachers'
    dynamic shift ``base_shift * sqrt(sqrt(H * W) / base_size)``. Returns (B, 3, H, W) float32.
    """
    if cfg_scale != 1.0 and negative_text is None:
        raise ValueError("cfg_scale != 1 needs negative_text (the encoded negative prompt)")
    shift = dynamic_shift(height, width, base_shift, base_size) if shift is None else float(shift)
    grid = teacher_time_grid(steps, shift)
    cond = net.prepare(text, lq_latent, degrade_sigma, height, width)
    batch = cond.batch
    guided = cfg_scale != 1.0
    cond_neg = None
    if guided:
        negative_text = broadcast_text(negative_text, batch, "negative_text")
        cond_neg = net.prepare(negative_text, lq_latent, degrade_sigma, height, width)
    pixeldit = net.config.lq is None
    chunk = _resolve_chunk(net, cond, chunk, max_memory, batch_factor=2 if guided else 1)
    same_len = guided and cond_neg.text.shape[1] == cond.text.shape[1]
    cond_pair = _stack_conditions(cond_neg, cond) if pixeldit and same_len else None
    device = net.device
    shape = (batch, net.config.in_channels, height, width)
    x = _initial_noise(noise, shape, generator, device)
    ts = grid.to(device)

    def data_prediction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_in = (t * TIMESCALE).expand(batch)
        if not guided:
            eps = x + (1 - t) * net.denoise(x, t_in, cond, chunk=chunk)
        elif cond_pair is not None:
            # parity: PixelDiT evaluates both branches as one batch-2B call (negative first).
            v_neg, v_pos = net.denoise(torch.cat([x, x]), torch.cat([t_in, t_in]), cond_pair, chunk=chunk).chunk(2)
            eps_neg, eps_pos = x + (1 - t) * v_neg, x + (1 - t) * v_pos
            eps = eps_neg + cfg_scale * (eps_pos - eps_neg)
        else:
            # parity: PiD evaluates the branches as two batch-B calls (negative first).
            eps_neg = x + (1 - t) * net.denoise(x, t_in, cond_neg, chunk=chunk)
            eps_pos = x + (1 - t) * net.denoise(x, t_in, cond, chunk=chunk)
            eps = eps_neg + cfg_scale * (eps_pos - eps_neg)
        # parity: the data prediction is formed from the noise prediction in float32, as the reference does.
        return (x - t * eps) / (1 - t)

    order = min(steps, 2)
    lam = _flow_lambda(ts)
    models = [data_prediction(x, ts[0])]
    for i in range(1, steps + 1):
        step_order = 1 if i < order else min(order, steps + 1 - i)
        if step_order == 1:
            x = _dpm_first_order(x, ts[i - 1], ts[i], lam[i - 1], lam[i], models[-1])
        else:
            x = _dpm_second_order(x, ts[i - 1], ts[i], lam[i - 2], lam[i - 1], lam[i], models[-2], models[-1])
        if i < steps:
            models = [models[-1], data_prediction(x, ts[i])]
        if callback is not None:
            callback(i, steps)
    return x.clamp(-1, 1) if clamp else x


def _flow_lambda(t: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of the flow schedule (alpha = 1 - t, sigma = t): log(1 - t) - log(t) (inf at t = 0)."""
    return torch.log(1 - t) - torch.log(t)


def _dpm_first_order(x, t_s, t, lam_s, lam_t, model_s):
    h = lam_t - lam_s
    alpha_t = torch.exp(torch.log(1 - t))
    phi_1 = torch.expm1(-h)
    return t / t_s * x - alpha_t * phi_1 * model_s


def _dpm_second_order(x, t_prev, t, lam_prev_1, lam_prev_0, lam_t, model_prev_1, model_prev_0):
    h_0 = lam_prev_0 - lam_prev_1
    h = lam_t - lam_prev_0
    r0 = h_0 / h
    d1 = (1.0 / r0) * (model_prev_0 - model_prev_1)
    alpha_t = torch.exp(torch.log(1 - t))
    phi_1 = torch.expm1(-h)
    return (t / t_prev) * x - (alpha_t * phi_1) * model_prev_0 - 0.5 * (alpha_t * phi_1) * d1


def _stack_conditions(first: Conditioning, second: Conditioning) -> Conditioning:
    """One conditioning for the batch ``cat([first, second])`` (used for batched guidance)."""
    cat = lambda a, b: None if a is None else torch.cat([a, b])
    return Conditioning(
        second.height, second.width, torch.cat([first.text, second.text]), second.rope_patch, second.rope_text,
        second.rope_pixel, second.pixel_pos,
        None if second.lq_feats is None else [cat(a, b) for a, b in zip(first.lq_feats, second.lq_feats)],
        cat(first.pit_feat, second.pit_feat), cat(first.sigma, second.sigma),
    )
