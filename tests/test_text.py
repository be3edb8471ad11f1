"""Text conditioning: CHI string, tokenisation/selection parity, cache, embedding files, errors.

A tiny random Gemma-2 (hidden 32, 1 layer) and a word-level tokenizer built here stand in for
Gemma-2-2b-it. The tokenizer attaches a space to the following word, so the CHI string alone ends in a
lone-space token that merges into the caption's first word in the joint text, as Gemma's does.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import subprocess
import sys

import pytest
import torch

from pid_decoder import text
from pid_decoder.text import (
    CHI_PROMPT,
    MODEL_MAX_LENGTH,
    NEGATIVE_PROMPT,
    MissingTextEncoderError,
    TextEncoder,
    embed_prompt_to_file,
    load_text_embedding,
    save_text_embedding,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HIDDEN = 32
LONG_PROMPT = " ".join(["a red cat"] * 150)  # 450 words: longer than the 299-token caption window


def _word_level_tokenizer(padding_side: str = "left"):
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Split(Regex(r" ?[^ ]+| +"), behavior="isolated")
    corpus = CHI_PROMPT + " " + NEGATIVE_PROMPT + " a cat red dog sleeping on the sofa"
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    for word, _ in split.pre_tokenize_str(corpus):
        vocab.setdefault(word, len(vocab))
    vocab.setdefault("a", len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    # Gemma's tokenizer class pads on the left by default; the encoder must pad on the right anyway.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
    )


def _gemma_config(vocab_size: int):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return _word_level_tokenizer()


@pytest.fixture(scope="module")
def decoder(tokenizer):
    from transformers import Gemma2Model

    torch.manual_seed(0)
    return Gemma2Model(_gemma_config(len(tokenizer))).eval()


@pytest.fixture(scope="module")
def num_chi(tokenizer):
    return len(tokenizer.encode(CHI_PROMPT))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    """A saved tiny Gemma-2 causal LM + tokenizer, loaded through the real from_pretrained path."""
    from transformers import Gemma2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-gemma")
    torch.manual_seed(1)
    Gemma2ForCausalLM(_gemma_config(len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _encoder(tokenizer, decoder, cache_dir=False, **kwargs) -> TextEncoder:
    kwargs.setdefault("dtype", torch.float32)
    return TextEncoder("tiny-gemma", tokenizer=tokenizer, decoder=decoder, cache_dir=cache_dir, **kwargs)


def _direct(tokenizer, decoder, prompts, num_chi):
    """The reference recipe written out: right padding to Lmax, <bos> + last 299 positions."""
    lmax = num_chi + MODEL_MAX_LENGTH - 2
    tokens = tokenizer(
        [CHI_PROMPT + p for p in prompts],
        max_length=lmax,
        padding="max_length",
        truncation=True,
        padding_side="right",
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = decoder(tokens["input_ids"], tokens["attention_mask"])[0]
    return hidden[:, [0] + list(range(lmax - 299, lmax))], tokens


class _ForwardCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


class _SpyTokenizer:
    """Records what the encoder hands to the tokenizer."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []

    def __call__(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        return self.inner(texts, **kwargs)

    def encode(self, text_):
        return self.inner.encode(text_)


# -- constants ---------------------------------------------------------------------------------------


def test_chi_prompt_is_the_reference_string():
    assert len(CHI_PROMPT) == 1057
    assert hashlib.sha256(CHI_PROMPT.encode("utf-8")).hexdigest() == (
        "62b9ab89eebb0ac5ee4d264bf96bf19d2b81f504bc3852500efeaf5a34d638b1"
    )
    lines = CHI_PROMPT.split("\n")
    assert len(lines) == 8 and lines[-1] == "User Prompt: "
    assert '"Enhanced prompt"' in lines[0]


def test_negative_prompt():
    assert NEGATIVE_PROMPT.startswith("low quality, worst quality, over-saturated,")
    assert NEGATIVE_PROMPT.endswith("plastic skin, jpeg artifacts, watermark")
    assert len(NEGATIVE_PROMPT.split(", ")) == 16


def test_import_does_not_import_transformers():
    code = "import sys, pid_decoder.text; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constructing_loads_nothing(tmp_path):
    enc = TextEncoder(tmp_path / "no-such-folder", cache_dir=tmp_path / "cache")
    assert not enc.loaded
    assert enc.identity.startswith("local:")


# -- tokenisation and selection ----------------------------------------------------------------------


def test_tokenizer_sees_chi_plus_prompt(tokenizer, decoder, num_chi):
    spy = _SpyTokenizer(tokenizer)
    _encoder(spy, decoder).encode(["a cat", ""])
    ((texts, kwargs),) = spy.calls
    assert texts == [CHI_PROMPT + "a cat", CHI_PROMPT]
    assert kwargs["max_length"] == num_chi + 300 - 2
    assert kwargs["padding"] == "max_length" and kwargs["truncation"] is True
    assert kwargs["padding_side"] == "right"


def test_selection_is_bos_plus_last_299(tokenizer, decoder, num_chi):
    prompts = ["a cat", "", "red dog sleeping on the sofa"]
    out = _encoder(tokenizer, decoder).encode(prompts)
    expected, tokens = _direct(tokenizer, decoder, prompts, num_chi)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The window starts at the caption: CHI's trailing-space token merged into " a".
    ids = tokens["input_ids"]
    assert ids[0, 0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(int(ids[0, num_chi - 1])) == " a"
    assert ids[0, -1] == tokenizer.pad_token_id  # right padding


def test_long_prompt_is_truncated(tokenizer, decoder, num_chi):
    enc = _encoder(tokenizer, decoder)
    out = enc.encode([LONG_PROMPT, LONG_PROMPT + " dog dog dog"])
    expected, tokens = _direct(tokenizer, decoder, [LONG_PROMPT], num_chi)
    assert tokens["input_ids"].shape[1] == num_chi + 298
    assert tokens["attention_mask"].all()
    torch.testing.assert_close(out[:1], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)  # the extra words fall past Lmax


def test_batch_rows_are_independent(tokenizer, decoder):
    enc = _encoder(tokenizer, decoder)
    batch = enc.encode(["a cat", "red dog"])
    torch.testing.assert_close(batch[1:], enc.encode("red dog"), rtol=1e-5, atol=1e-6)
    assert not torch.equal(batch[0], batch[1])


def test_bf16_default_output_is_float32_cpu(tokenizer, decoder, num_chi):
    bf16 = copy.deepcopy(decoder)
    out = TextEncoder("tiny", tokenizer=tokenizer, decoder=bf16, cache_dir=False).encode(["a cat", ""])
    assert out.shape == (2, MODEL_MAX_LENGTH, HIDDEN)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert next(bf16.parameters()).dtype == torch.bfloat16
    expected, _ = _direct(tokenizer, bf16, ["a cat", ""], num_chi)
    torch.testing.assert_close(out, expected.float(), rtol=0, atol=0)


def test_negative_prompt_helper(tokenizer, decoder):
    enc = _encoder(tokenizer, decoder)
    neg = enc.encode_negative(batch_size=2)
    assert neg.shape == (2, MODEL_MAX_LENGTH, HIDDEN)
    torch.testing.assert_close(neg[1:], enc.encode(NEGATIVE_PROMPT), rtol=0, atol=0)


@pytest.mark.parametrize("bad, error", [([], ValueError), ([1], TypeError), (None, ValueError)])
def test_bad_prompts(tokenizer, decoder, bad, error):
    with pytest.raises(error, match="prompt"):
        _encoder(tokenizer, decoder).encode(bad)


# -- cache -------------------------------------------------------------------------------------------


def test_cache_hit_skips_the_decoder(tokenizer, decoder, tmp_path):
    counter = _ForwardCounter(decoder)
    try:
        enc = _encoder(tokenizer, decoder, cache_dir=tmp_path)
        first = enc.encode(["a cat", "a cat", ""])  # duplicates are encoded once
        assert counter.calls == 1
        again = enc.encode(["", "a cat"])
        assert counter.calls == 1
        torch.testing.assert_close(again, first[[2, 0]], rtol=0, atol=0)
        mixed = enc.encode(["a cat", "red dog"])  # one hit, one miss
        assert counter.calls == 2
        torch.testing.assert_close(mixed[:1], first[:1], rtol=0, atol=0)
    finally:
        counter.handle.remove()
    files = sorted(tmp_path.rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 3
    assert not [f for f in files if f.name.endswith(".tmp")]


def test_cache_hit_never_loads_the_model(model_folder, tmp_path, monkeypatch):
    first = TextEncoder(model_folder, dtype=torch.float32, cache_dir=tmp_path).encode("a cat")

    def refuse(*args, **kwargs):
        raise AssertionError("Gemma was loaded on a cache hit")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    enc = TextEncoder(model_folder, dtype=torch.float32, cache_dir=tmp_path)
    torch.testing.assert_close(enc.encode("a cat"), first, rtol=0, atol=0)
    assert not enc.loaded


def test_identity_separates_encoders(tokenizer, decoder, model_folder, tmp_path):
    base = _encoder(tokenizer, decoder)
    assert base.identity != _encoder(tokenizer, decoder, dtype=torch.bfloat16).identity
    assert base.identity != TextEncoder("other", tokenizer=tokenizer, decoder=decoder, dtype=torch.float32).identity
    assert TextEncoder(model_folder).identity != TextEncoder(tmp_path).identity
    hub = TextEncoder().identity
    assert hub.startswith("hub:Efficient-Large-Model/gemma-2-2b-it@")
    assert "max_length=300" in hub and "dtype=bfloat16" in hub and text.CHI_SHA256[:16] in hub
    cache = text._EmbeddingCache(tmp_path)
    assert cache.path(base.identity, "a cat") != cache.path(hub, "a cat")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path))
    assert TextEncoder().cache_dir == tmp_path / "text"
    monkeypatch.delenv("PID_CACHE_DIR")
    assert text.default_cache_dir() == text.Path.home() / ".cache" / "pid-decoder" / "text"
    assert TextEncoder(cache_dir=False).cache_dir is None


def test_corrupt_cache_entry_is_recomputed(tokenizer, decoder, tmp_path, caplog):
    enc = _encoder(tokenizer, decoder, cache_dir=tmp_path)
    good = enc.encode("a cat")
    (entry,) = tmp_path.rglob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="pid_decoder.text"):
        torch.testing.assert_close(enc.encode("a cat"), good, rtol=0, atol=0)
    assert "unreadable" in caplog.text
    load_text_embedding(entry)  # rewritten


def test_no_cache_writes_nothing(tokenizer, decoder, tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path))
    _encoder(tokenizer, decoder, cache_dir=False).encode("a cat")
    assert not list(tmp_path.iterdir())


# -- loading from a folder, unload, errors -----------------------------------------------------------


def test_loads_local_folder(model_folder, tokenizer, num_chi):
    from transformers import Gemma2ForCausalLM

    enc = TextEncoder(model_folder, dtype=torch.float32, cache_dir=False)
    out = enc.encode(["a cat", ""])
    assert enc.loaded and enc.num_chi == num_chi
    reference = Gemma2ForCausalLM.from_pretrained(model_folder).get_decoder()
    expected, _ = _direct(tokenizer, reference, ["a cat", ""], num_chi)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    enc.unload()
    assert not enc.loaded
    torch.testing.assert_close(enc.encode("a cat"), out[:1], rtol=0, atol=0)  # reloads on demand


def test_unload_keeps_injected_objects(tokenizer, decoder):
    enc = _encoder(tokenizer, decoder)
    enc.encode("a cat")
    enc.unload()
    assert enc.loaded
    enc.encode("a cat")


def test_missing_local_folder_message(tmp_path):
    enc = TextEncoder(tmp_path / "gemma-2-2b-it", cache_dir=False)
    with pytest.raises(MissingTextEncoderError, match="does not exist") as info:
        enc.encode("a cat")
    message = str(info.value)
    assert "download Efficient-Large-Model/gemma-2-2b-it --local-dir" in message
    assert "pid-decoder embed" in message


def test_offline_without_model_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    enc = TextEncoder("pid-decoder-test/not-a-model", cache_dir=False)
    with pytest.raises(MissingTextEncoderError, match="offline") as info:
        enc.encode("a cat")
    message = str(info.value)
    assert "huggingface-cli download pid-decoder-test/not-a-model --local-dir" in message
    assert "pid-decoder embed" in message and "HF_HUB_OFFLINE" in message


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dtype"):
        TextEncoder(dtype=torch.int64)
    with pytest.raises(ValueError, match="cache_dir"):
        TextEncoder(cache_dir=True)


# -- embedding files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_file_round_trip(tmp_path, dtype):
    emb = torch.randn(MODEL_MAX_LENGTH, HIDDEN).to(dtype)
    path = save_text_embedding(tmp_path / "e.safetensors", emb, prompt="a cat", encoder="enc-id")
    loaded, meta = load_text_embedding(path)
    assert loaded.dtype == torch.float32 and loaded.shape == (MODEL_MAX_LENGTH, HIDDEN)
    torch.testing.assert_close(loaded, emb.float(), rtol=0, atol=0)
    assert meta == {"format": "pid-decoder/text-embedding", "version": "1", "prompt": "a cat", "encoder": "enc-id"}


def test_embedding_file_accepts_leading_batch_of_one(tmp_path):
    from safetensors.torch import save_file

    emb = torch.randn(1, 7, HIDDEN)
    save_file({"text_embedding": emb}, str(tmp_path / "e.safetensors"))
    loaded, meta = load_text_embedding(tmp_path / "e.safetensors")
    assert loaded.shape == (7, HIDDEN) and meta == {}
    save_text_embedding(tmp_path / "f.safetensors", emb, prompt="", encoder="x")
    assert load_text_embedding(tmp_path / "f.safetensors")[0].shape == (7, HIDDEN)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"other": torch.zeros(3, 4)}, "no tensor 'text_embedding'"),
        ({"text_embedding": torch.zeros(12)}, r"\(T, D\)"),
        ({"text_embedding": torch.zeros(2, 3, 4)}, r"\(T, D\)"),
        ({"text_embedding": torch.tensor([[0.0, float("nan")]])}, "NaN"),
        ({"text_embedding": torch.zeros(3, 4, dtype=torch.int32)}, "floating"),
    ],
)
def test_embedding_file_validation(tmp_path, tensors, match):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=match):
        load_text_embedding(path)


def test_embedding_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pid-decoder embed"):
        load_text_embedding(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_text_embedding(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        save_text_embedding(tmp_path / "h.safetensors", torch.zeros(3, 4, dtype=torch.float16), prompt="", encoder="x")
    with pytest.raises(ValueError, match="NaN"):
        save_text_embedding(tmp_path / "n.safetensors", torch.full((3, 4), float("inf")), prompt="", encoder="x")


def test_embed_prompt_to_file(tokenizer, decoder, tmp_path):
    enc = _encoder(tokenizer, decoder)
    path = embed_prompt_to_file("a cat", tmp_path / "out" / "emb.safetensors", enc)
    loaded, meta = load_text_embedding(path)
    torch.testing.assert_close(loaded, enc.encode("a cat")[0], rtol=0, atol=0)
    assert meta["prompt"] == "a cat" and meta["encoder"] == enc.identity


def test_float16_encoder_is_cached(tokenizer, decoder, tmp_path):
    fp16 = copy.deepcopy(decoder)
    enc = TextEncoder("tiny", tokenizer=tokenizer, decoder=fp16, dtype=torch.float16, cache_dir=tmp_path)
    first = enc.encode("a cat")
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    torch.testing.assert_close(enc.encode("a cat"), first, rtol=0, atol=0)
