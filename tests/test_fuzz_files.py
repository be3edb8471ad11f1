"""Property-based fuzzing of the weight-file readers: random, truncated and corrupted bytes.

Whatever the bytes, opening a checkpoint, a backbone weight file or a text-embedding file either succeeds or raises
one of the documented exception types (ValueError, TypeError, FileNotFoundError, PermissionError) with a message;
nothing in a file is ever executed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pid_decoder.backbones.weights import read_state_dict
from pid_decoder.checkpoints import open_checkpoint
from pid_decoder.text import load_text_embedding, save_text_embedding

DOCUMENTED = (ValueError, TypeError, FileNotFoundError, PermissionError)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid(folder) -> dict[str, bytes]:
    """A valid file of each format, to truncate and corrupt."""
    from safetensors.torch import save

    tensors = {"net.a.weight": torch.randn(4, 3), "net.b.bias": torch.randn(5).bfloat16()}
    zip_buf, legacy_buf = io.BytesIO(), io.BytesIO()
    torch.save(tensors, zip_buf)
    torch.save(tensors, legacy_buf, _use_new_zipfile_serialization=False)
    emb_path = save_text_embedding(folder / "emb-valid.safetensors", torch.randn(8, 24), prompt="p", encoder="test")
    return {
        "zip": zip_buf.getvalue(),
        "legacy": legacy_buf.getvalue(),
        "safetensors": save(tensors, metadata={"format": "x"}),
        "embedding": emb_path.read_bytes(),
    }


def check(call, path: Path) -> None:
    try:
        call(path)
    except DOCUMENTED as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        assert "Traceback" not in str(err)


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".pth", ".pt", ".safetensors", ".bin"]))
def test_checkpoint_random_bytes(folder, data, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(data)
    check(open_checkpoint, path)
    check(lambda p: read_state_dict(p, "flux", "ae.safetensors"), path)


@FUZZ
@given(kind=st.sampled_from(["zip", "legacy", "safetensors"]), cut=st.floats(0, 1, exclude_max=True))
def test_checkpoint_truncated(folder, valid, kind, cut):
    data = valid[kind]
    path = folder / f"truncated-{kind}.pth"
    path.write_bytes(data[: int(len(data) * cut)])
    check(open_checkpoint, path)


@FUZZ
@given(kind=st.sampled_from(["zip", "legacy", "safetensors"]), edits=EDITS)
def test_checkpoint_corrupted(folder, valid, kind, edits):
    path = folder / f"corrupt-{kind}.pth"
    path.write_bytes(mutate(valid[kind], edits))
    check(open_checkpoint, path)
    check(lambda p: read_state_dict(p, "flux", "ae.safetensors"), path)


@FUZZ
@given(data=st.binary(max_size=512))
def test_text_embedding_random_bytes(folder, data):
    path = folder / "random-emb.safetensors"
    path.write_bytes(data)
    check(load_text_embedding, path)


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True), edits=st.one_of(st.none(), EDITS))
def test_text_embedding_truncated_or_corrupted(folder, valid, cut, edits):
    data = valid["embedding"]
    data = data[: max(1, int(len(data) * cut))] if edits is None else mutate(data, edits)
    path = folder / "bad-emb.safetensors"
    path.write_bytes(data)
    check(load_text_embedding, path)


class Marker:
    """Unpickling this would create a marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(protocol=st.integers(0, pickle.HIGHEST_PROTOCOL), container=st.sampled_from(["plain", "torch", "legacy"]),
       suffix=st.sampled_from([".pth", ".safetensors", ".pt"]))
def test_code_in_a_file_never_runs(folder, protocol, container, suffix):
    marker = folder / "MARKER"
    marker.unlink(missing_ok=True)
    payload = {"w": torch.zeros(1), "evil": Marker(marker)}
    if container == "plain":
        data = pickle.dumps(payload, protocol=protocol)
    else:
        buf = io.BytesIO()
        torch.save(payload, buf, pickle_protocol=max(protocol, 2),
                   _use_new_zipfile_serialization=container == "torch")
        data = buf.getvalue()
    path = folder / f"evil{suffix}"
    path.write_bytes(data)
    for call in (open_checkpoint, lambda p: read_state_dict(p, "flux", "ae.safetensors"), load_text_embedding):
        with pytest.raises(DOCUMENTED):
            call(path)
    assert not marker.exists()


KEYS = ["s_embedder.proj.weight", "lq_proj.latent_proj.0.weight", "pit_lq_gate.log_alpha", "patch_blocks.0.x",
        "net.s_embedder.proj.weight", "net_ema.a", "lq_proj.lq_aux_rgb_head.w", "x"]
SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@FUZZ
@given(state=st.dictionaries(st.sampled_from(KEYS), SHAPES, max_size=6), safetensors=st.booleans())
def test_describe_and_load_any_tensor_dict(folder, state, safetensors):
    from safetensors.torch import save_file

    from pid_decoder.checkpoints import describe, load_network

    from .test_pipeline_support import tiny_net_config

    tensors = {k: torch.zeros(shape) for k, shape in state.items()}
    path = folder / ("dict.safetensors" if safetensors else "dict.pth")
    if safetensors:
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    check(describe, path)
    check(load_network, path)
    check(lambda p: load_network(p, tiny_net_config()), path)
