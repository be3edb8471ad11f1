"""Devices, dtypes and seeds (`pid_decoder.devices`): what "auto" resolves to, and the one-line refusals of a device
this machine lacks, a dtype PiD does not run in, or a seed a generator cannot take. CUDA's presence is patched where
a message depends on it, so every case runs on every machine."""

from __future__ import annotations

import pytest
import torch

from pid_decoder.devices import (
    SEED_MAX,
    available_devices,
    check_device,
    check_seed,
    parse_dtype,
    resolve_device,
    resolve_dtype,
    resolve_noise_device,
)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


# --------------------------------------------------------------------------- devices
def test_auto_is_left_to_resolve_device_and_cpu_is_a_torch_device():
    assert check_device("auto") is None and check_device(None) is None
    assert check_device("cpu") == check_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_resolves_to_cpu_without_cuda_or_mps(no_cuda, monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert available_devices() == ["cpu"]


def test_auto_prefers_cuda(one_gpu):
    assert resolve_device("auto") == torch.device("cuda")
    assert available_devices() == ["cpu", "cuda:0"]


@pytest.mark.parametrize(("device", "message"), [
    ("tpu", r"^unknown device 'tpu'; use one of cpu or 'auto' \(device names: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'\)$"),
    ("gpu0", r"^unknown device 'gpu0'; use one of cpu"),
    ("meta", r"^unknown device 'meta'"),
    ("", r"^device is empty \(unknown device ''\); use one of cpu or 'auto'"),
    ("cuda", (r"^device 'cuda' requested but CUDA is not available on this machine \(.*\)\. Available devices: cpu; "
              r"use 'cpu' \(CLI: --device cpu, API: device=\"cpu\"\)$")),
    ("cuda:0", r"^device 'cuda:0' requested but CUDA is not available"),
])
def test_devices_this_machine_lacks_are_refused_in_one_line(no_cuda, device, message):
    with pytest.raises(ValueError, match=message) as info:
        resolve_device(device)
    assert "\n" not in str(info.value)


def test_cuda_index_beyond_the_devices(one_gpu):
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"^device 'cuda:3' does not exist: this machine has 1 CUDA device\(s\)\. "
                                         r"Available devices: cpu, cuda:0$"):
        check_device("cuda:3")


def test_cuda_without_a_cuda_build_says_so(no_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=r"this PyTorch build has no CUDA support"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError, match=r"no GPU is visible"):
        check_device("cuda")


def test_mps_without_mps(monkeypatch):
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'mps' requested but MPS \(Apple GPU\) is not available .*use 'cpu'"):
        check_device("mps")


def test_training_device_resolution(no_cuda):
    from pid_decoder.training.distributed import resolve_device as run_device

    assert run_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"run.device is 'cuda' but CUDA is not available"):
        run_device("cuda")
    with pytest.raises(ValueError, match=r"^run.device: unknown device 'tpu'; use one of cpu"):
        run_device("tpu")
    with pytest.raises(ValueError, match=r"^run.device: device 'cuda:1' requested but CUDA is not available"):
        run_device("cuda:1")


def test_training_cuda_is_the_local_rank(one_gpu):
    from pid_decoder.training.distributed import resolve_device as run_device

    assert run_device("cuda", local_rank=3) == torch.device("cuda", 3)


# --------------------------------------------------------------------------- dtypes
def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) == torch.float16


@pytest.mark.parametrize(("name", "dtype"), [
    ("fp32", torch.float32), ("float", torch.float32), ("BF16", torch.bfloat16), ("half", torch.float16),
])
def test_dtype_names(name, dtype):
    assert parse_dtype(name) == dtype


def test_dtypes_pid_does_not_run_in():
    with pytest.raises(ValueError, match=r"^unknown dtype 'int8'; use one of fp32, bf16, fp16$"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match=r"dtype must be float32, bfloat16 or float16, got torch.float64"):
        parse_dtype(torch.float64)


# --------------------------------------------------------------------------- noise device
def test_noise_device(no_cuda):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_noise_device("auto", cpu) == cpu
    assert resolve_noise_device("auto", cuda) == cuda  # the reference draws on the network's CUDA device
    assert resolve_noise_device("cpu", cuda) == cpu
    with pytest.raises(ValueError, match=r"noise device must be 'auto', 'cpu' or a CUDA device, got 'mps'"):
        resolve_noise_device("mps", cpu)
    with pytest.raises(ValueError, match=r"noise device 'cuda:0' requested but CUDA is not available"):
        resolve_noise_device("cuda:0", cpu)


# --------------------------------------------------------------------------- seeds
def test_seed_range_is_the_generators():
    assert check_seed(0) == 0 and check_seed(SEED_MAX) == SEED_MAX == 2**64 - 1
    assert check_seed(SEED_MAX - 3, count=4) == SEED_MAX - 3
    import numpy as np

    assert check_seed(np.int64(7)) == 7 and type(check_seed(np.int64(7))) is int


@pytest.mark.parametrize(("seed", "count", "error", "message"), [
    (-1, 1, ValueError, r"^seed must be in \[0, 2\*\*64 - 1\], got -1$"),
    (2**64, 1, ValueError, r"^seed must be in \[0, 2\*\*64 - 1\], got 18446744073709551616$"),
    (SEED_MAX, 2, ValueError, r"\(item seeds run up to seed \+ 1\)"),
    (True, 1, TypeError, r"^seed must be a whole number in \[0, 2\*\*64 - 1\], got True \(bool\)$"),
    (1.0, 1, TypeError, r"got 1\.0 \(float\)"),
])
def test_seeds_a_generator_cannot_take(seed, count, error, message):
    with pytest.raises(error, match=message):
        check_seed(seed, count)


def test_seed_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"^ldm_seed must be in"):
        check_seed(-5, name="ldm_seed")
