"""Property-based fuzzing of the input readers: random, truncated and bit-flipped latent files and images give
either a valid result or the documented ValueError with a message naming the file, never another exception,
and a pickle never runs code."""

from __future__ import annotations

import io
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pid_decoder.io import LATENT_SUFFIXES, load_latent, read_image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _latent_bytes(suffix: str) -> bytes:
    latent = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"latent": latent}, path)
        elif suffix == ".npy":
            np.save(path, latent.numpy())
        else:
            torch.save(latent, path)
        return path.read_bytes()


VALID = {suffix: _latent_bytes(suffix) for suffix in LATENT_SUFFIXES}


def _image_bytes(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP")}


def _check_latent(data: bytes, suffix: str, folder: Path) -> None:
    path = folder / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        x = load_latent(path)
    except ValueError as err:
        assert str(path) in str(err) and len(str(err)) > len(str(path)) + 10
    else:  # whatever is accepted is a usable latent
        assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[0] >= 1 and x.numel() > 0
        assert bool(torch.isfinite(x).all())


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from(LATENT_SUFFIXES))
def test_random_bytes_as_latent_file(tmp_path, data, suffix):
    _check_latent(data, suffix, tmp_path)


@FUZZ
@given(suffix=st.sampled_from(LATENT_SUFFIXES), cut=st.floats(0.0, 1.0))
def test_truncated_latent_file(tmp_path, suffix, cut):
    data = VALID[suffix]
    _check_latent(data[: int(len(data) * cut)], suffix, tmp_path)


@FUZZ
@given(suffix=st.sampled_from(LATENT_SUFFIXES), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                               min_size=1, max_size=4))
def test_bit_flipped_latent_file(tmp_path, suffix, flips):
    data = bytearray(VALID[suffix])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _check_latent(bytes(data), suffix, tmp_path)


@FUZZ
@given(payload=st.sampled_from(["os.system", "builtins.exec", "subprocess.call"]), proto=st.integers(2, 5))
def test_pickles_never_run(tmp_path, payload, proto):
    marker = tmp_path / "MARKER"
    module, name = payload.split(".")

    class Evil:
        def __reduce__(self):
            import importlib

            func = getattr(importlib.import_module(module), name)
            arg = f"open({str(marker)!r}, 'w')" if name == "exec" else f"touch {marker}"
            return (func, (arg if name != "call" else ["touch", str(marker)],))

    for path, writer in ((tmp_path / "a.pt", "torch"), (tmp_path / "b.pth", "pickle")):
        if writer == "torch":
            torch.save({"latent": Evil()}, path)
        else:
            path.write_bytes(pickle.dumps({"latent": Evil()}, protocol=proto))
        with pytest.raises(ValueError, match=str(path.name)):
            load_latent(path)
    assert not marker.exists()


def _check_image(data: bytes, folder: Path, name: str = "fuzz.png") -> None:
    path = folder / name
    path.write_bytes(data)
    try:
        image = read_image(path)
    except ValueError as err:
        assert str(path) in str(err)
    else:
        assert image.width >= 1 and image.height >= 1


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_as_image(tmp_path, data):
    _check_image(data, tmp_path)


@FUZZ
@given(fmt=st.sampled_from(sorted(IMAGES)), cut=st.floats(0.0, 0.999))
def test_truncated_image(tmp_path, fmt, cut):
    data = IMAGES[fmt]
    _check_image(data[: int(len(data) * cut)], tmp_path, f"fuzz.{fmt.lower()}")


@FUZZ
@given(fmt=st.sampled_from(sorted(IMAGES)), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                          min_size=1, max_size=4))
def test_bit_flipped_image(tmp_path, fmt, flips):
    data = bytearray(IMAGES[fmt])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _check_image(bytes(data), tmp_path, f"fuzz.{fmt.lower()}")


def test_valid_files_still_load(tmp_path):
    for suffix, data in VALID.items():
        (tmp_path / f"ok{suffix}").write_bytes(data)
        assert load_latent(tmp_path / f"ok{suffix}").shape == (1, 16, 2, 3)
    for fmt, data in IMAGES.items():
        (tmp_path / f"ok.{fmt.lower()}").write_bytes(data)
        assert read_image(tmp_path / f"ok.{fmt.lower()}").size == (20, 24)
