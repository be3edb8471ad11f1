"""Text conditioning: Gemma-2-2b-it prompt embeddings, their disk cache and their file format.

PiD is conditioned on the last hidden state of the bare Gemma-2 decoder stack (no LM head), computed
for the CHI instruction (`CHI_PROMPT`) followed by the caption. Of the ``Lmax = num_chi + 300 - 2``
token positions the reference keeps ``<bos>`` and the last 299, i.e. ``T = 300`` vectors of size
``D = hidden_size`` (2304 for Gemma-2-2b). The attention mask is not returned: the PiD network never
receives it (spec text.md section 4).

Shape legend: B prompts, N = Lmax tokenised positions, T = 300 selected tokens, D hidden size.

Loading is lazy: a `TextEncoder` loads Gemma only on the first prompt that is not in the disk cache,
so a repeated prompt never touches the model. transformers is imported inside functions only, so
``import pid_decoder.text`` stays cheap.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import weights
from .atomic import atomic_write_bytes
from .checkpoints import check_weight_path, file_kind
from .devices import resolve_device
from .registry import DEFAULT_TEXT_ENCODER, looks_like_hub_id

logger = logging.getLogger(__name__)

MODEL_MAX_LENGTH = 300  # text tokens given to the network (reference model_max_length)

# The reference's Complex Human Instruction: these 8 lines joined with "\n". The last line ends in a
# space and there is no final newline; line 1 quotes "Enhanced prompt" with double quotes.
_CHI_LINES = (
    (
        'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable '
        "for image generation. Evaluate the level of detail in the user prompt:"
    ),
    (
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
        "relationships to create vivid and concrete scenes."
    ),
    ("- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating."),
    "Here are examples of how to transform or refine prompts:",
    (
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
        "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers."
    ),
    (
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
        "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
        "glass skyscrapers."
    ),
    (
        "Please generate only the enhanced description for the prompt below and avoid including any additional "
        "commentary or evaluations:"
    ),
    "User Prompt: ",
)
CHI_PROMPT: str = "\n".join(_CHI_LINES)
CHI_SHA256 = hashlib.sha256(CHI_PROMPT.encode("utf-8")).hexdigest()

# Unconditional branch of the teacher sampler's CFG (spec sampler.md section 2); the distilled
# student sampler does not use it.
NEGATIVE_PROMPT: str = (
    "low quality, worst quality, over-saturated, three legs, six fingers, cartoon, anime, cgi, low res, "
    "blurry, deformed, distortion, duplicated limbs, plastic skin, jpeg artifacts, watermark"
)

EMBEDDING_FORMAT = "pid-decoder/text-embedding"
EMBEDDING_FORMAT_VERSION = "1"
EMBEDDING_KEY = "text_embedding"

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class MissingTextEncoderError(FileNotFoundError):
    """The Gemma text encoder is needed (a prompt is not cached) but cannot be loaded."""


# --------------------------------------------------------------------------------------------------
# Embedding files
# --------------------------------------------------------------------------------------------------


def save_text_embedding(
    path: str | os.PathLike, embedding: torch.Tensor, *, prompt: str, encoder: str | TextEncoder
) -> Path:
    """Write one prompt's embedding as safetensors: tensor ``text_embedding`` (T, D) plus metadata.

    ``embedding`` is (T, D) or (1, T, D), float32 or bfloat16, finite; it is stored in its own dtype.
    ``encoder`` is a `TextEncoder` or its `identity` string; it is recorded so a file can be traced to
    the model that made it. The write is atomic (temporary file + rename). Returns the path.
    """
    from safetensors.torch import save

    emb = _check_embedding(embedding, f"embedding for {path}")
    if emb.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"text embedding must be float32 or bfloat16, got {emb.dtype}; convert it with .float() first")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    identity = encoder.identity if isinstance(encoder, TextEncoder) else str(encoder)
    metadata = {
        "format": EMBEDDING_FORMAT,
        "version": EMBEDDING_FORMAT_VERSION,
        "prompt": prompt,
        "encoder": identity,
    }
    data = save({EMBEDDING_KEY: emb.detach().to("cpu").contiguous()}, metadata=metadata)
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def load_text_embedding(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a file written by `save_text_embedding` (or `pid-decoder embed`).

    Returns ``(embedding, metadata)``: embedding (T, D) float32 on CPU, metadata the file's string
    metadata (``prompt``, ``encoder``, ``format``, ``version``; may be empty for foreign files).
    A (1, T, D) tensor is accepted and squeezed. Raises FileNotFoundError for a missing file and
    ValueError for anything that is not a single finite 2-D floating-point ``text_embedding``.
    """
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"text embedding must be the path of a .safetensors file, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"text embedding file {str(path)!r} does not exist; "
            'create one with `pid-decoder embed "your prompt" -o emb.safetensors`'
        )
    head = check_weight_path(path, "text embedding file", flag="--text-embedding", param="text_embedding")
    kind = file_kind(head, path.stat().st_size)
    if kind != "safetensors":
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file (it looks like {kind}); expected the text embedding "
            "file "
            'written by `pid-decoder embed "your prompt" -o emb.safetensors` (API: save_text_embedding)'
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            if EMBEDDING_KEY not in keys:
                raise ValueError(
                    f"{str(path)!r} has no tensor {EMBEDDING_KEY!r} (found {keys[:8]}); it is not a text embedding "
                    'file. Create one with `pid-decoder embed "your prompt" -o emb.safetensors`'
                )
            emb = f.get_tensor(EMBEDDING_KEY)
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    fmt = metadata.get("format")
    if fmt is not None and fmt != EMBEDDING_FORMAT:
        raise ValueError(f"{str(path)!r} has format {fmt!r}, expected {EMBEDDING_FORMAT!r}")
    emb = _check_embedding(emb, repr(str(path)))
    return emb.float(), metadata


def embed_prompt_to_file(prompt: str, out_path: str | os.PathLike, encoder: TextEncoder | None = None) -> Path:
    """Encode ``prompt`` (CHI prefix added) and write it with `save_text_embedding`.

    This is what ``pid-decoder embed "prompt" -o emb.safetensors`` does; the file lets a machine
    without Gemma (or without VRAM to spare) decode with that prompt. ``encoder`` defaults to
    ``TextEncoder()`` (Gemma on the CPU, cache on). The tensor is stored in the encoder's dtype
    (bf16 by default), which is lossless for the reference's bf16 Gemma output. Returns the path.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    encoder = TextEncoder() if encoder is None else encoder
    emb = encoder._encode_raw([prompt])[0]  # (T, D), Gemma's own dtype
    if emb.dtype not in (torch.float32, torch.bfloat16):
        emb = emb.float()
    return save_text_embedding(out_path, emb, prompt=prompt, encoder=encoder)


def _check_embedding(emb: Any, what: str) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(emb).__name__}")
    if emb.ndim == 3 and emb.shape[0] == 1:
        emb = emb[0]  # (T, D)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"{what}: expected a non-empty (T, D) text embedding, got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got {emb.dtype}")
    if not torch.isfinite(emb).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return emb


# --------------------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$PID_CACHE_DIR/text`` if PID_CACHE_DIR is set, else ``~/.cache/pid-decoder/text``."""
    root = os.environ.get("PID_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "pid-decoder") / "text"


class _EmbeddingCache:
    """One safetensors file per (encoder identity, prompt), in the embedding file format."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, identity: str, prompt: str) -> Path:
        key = hashlib.sha256(json.dumps([identity, prompt]).encode("utf-8")).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, identity: str, prompt: str) -> torch.Tensor | None:
        path = self.path(identity, prompt)
        if not path.is_file():
            return None
        try:
            emb, meta = load_text_embedding(path)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable text-embedding cache entry %s: %s", path, exc)
            return None
        if meta.get("prompt") != prompt or meta.get("encoder") != identity:
            logger.warning("ignoring text-embedding cache entry %s: its metadata does not match the key", path)
            return None
        return emb

    def put(self, identity: str, prompt: str, emb: torch.Tensor) -> None:
        path = self.path(identity, prompt)
        if emb.dtype not in (torch.float32, torch.bfloat16):
            emb = emb.float()  # e.g. a float16 Gemma: float32 holds it exactly
        try:
            save_text_embedding(path, emb, prompt=prompt, encoder=identity)
        except (OSError, ValueError) as exc:  # a read-only disk or a non-finite output is not cached
            logger.warning("could not write text-embedding cache entry %s: %s", path, exc)


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


class TextEncoder:
    """Gemma-2 prompt encoder with the reference's CHI prefix, token selection and a disk cache.

    Args:
        model: a local folder holding a Gemma-2 causal LM + tokenizer (e.g. a ``huggingface-cli
            download`` of Efficient-Large-Model/gemma-2-2b-it) or a Hugging Face hub id. With
            ``tokenizer=``/``decoder=`` given it is only a label for the cache identity.
        device: where Gemma runs ("cpu", "cuda", "cuda:1", a torch.device; "auto" as `devices.resolve_device`).
            CPU needs about 5 GB RAM in bf16 and leaves the GPU to the decoder.
        dtype: Gemma's weight dtype; the reference uses bfloat16.
        cache_dir: folder of the prompt-embedding cache; None -> `default_cache_dir()`, False -> no cache.
        local_files_only: never download; None follows the HF_HUB_OFFLINE environment variable.
        revision: hub revision (branch, tag or commit) to load.
        tokenizer, decoder: already-built objects to use instead of loading ``model``: a
            transformers tokenizer and a Gemma-2 decoder stack (e.g. ``Gemma2Model``). The decoder is
            moved to ``device``/``dtype`` and put in eval mode (in place) on first use.

    Constructing an encoder loads nothing; Gemma is loaded on the first cache miss.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_TEXT_ENCODER,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        cache_dir: str | os.PathLike | None | bool = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        tokenizer: Any = None,
        decoder: Any = None,
    ):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
        if cache_dir is True:
            raise ValueError("cache_dir must be a folder, None (default folder) or False (no cache), got True")
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a folder or a hub id (str), got {type(model).__name__}")
        self.model = os.fspath(model)
        self.device = resolve_device(device)  # before any loading: "cuda" without CUDA names the devices there are
        self.dtype = dtype
        self.revision = revision
        self.local_files_only = local_files_only
        self.cache_dir: Path | None = (
            None if cache_dir is False else (default_cache_dir() if cache_dir is None else Path(cache_dir))
        )
        self._cache = _EmbeddingCache(self.cache_dir) if self.cache_dir is not None else None
        self._injected = tokenizer is not None or decoder is not None
        self._tokenizer = tokenizer
        self._decoder = decoder
        self._owns_model = False  # True once this object loaded (and may unload) the model
        self._prepared = False
        self._num_chi: int | None = None
        self._identity: str | None = None

    def __repr__(self) -> str:
        return (
            f"TextEncoder({self.model!r}, device={str(self.device)!r}, dtype={self.dtype}, "
            f"cache_dir={str(self.cache_dir) if self.cache_dir else None!r}, loaded={self.loaded})"
        )

    # -- identity ---------------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """String naming everything that determines an embedding except the prompt.

        Source (hub id + commit when it is in the local HF cache, or local folder + a fingerprint of
        its files, or ``custom:<model>`` for injected objects), weight dtype, MODEL_MAX_LENGTH and the
        CHI hash. Used as the cache key and recorded in embedding files. The device is not part of it:
        CPU and GPU results differ by bf16 rounding only.
        """
        if self._identity is None:
            dtype = str(self.dtype).removeprefix("torch.")
            self._identity = (
                f"{self._source_identity()}|dtype={dtype}|max_length={MODEL_MAX_LENGTH}|chi={CHI_SHA256[:16]}"
            )
        return self._identity

    def _source_identity(self) -> str:
        if self._injected:
            source = f"custom:{self.model}"
            config = getattr(self._decoder, "config", None)
            if config is not None and hasattr(config, "to_json_string"):
                blob = config.to_json_string(use_diff=False).encode("utf-8")
                source += f"#config={hashlib.sha256(blob).hexdigest()[:16]}"
            return source
        folder = Path(self.model).expanduser()
        if folder.is_dir():
            return f"local:{folder.resolve()}#{_folder_fingerprint(folder)}"
        if not self._is_hub_id():
            return f"local:{folder.absolute()}#missing"
        return f"hub:{self.model}@{self._hub_commit() or self.revision or 'main'}"

    def _is_hub_id(self) -> bool:
        return looks_like_hub_id(self.model)

    def _hub_commit(self) -> str | None:
        """Commit of the revision in the local HF cache (no network), if it is there."""
        if self.revision is not None and _COMMIT.match(self.revision):
            return self.revision
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(self.model, "config.json", revision=self.revision)
        except (ValueError, OSError):  # an odd id or cache layout only costs the commit in the identity
            return None
        if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
            return Path(cached).parent.name
        return None

    # -- loading ----------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._decoder is not None and self._tokenizer is not None

    @property
    def num_chi(self) -> int:
        """Number of tokens of the CHI prompt alone, ``<bos>`` included (loads Gemma if not loaded)."""
        if self._num_chi is None:
            self._load()
        assert self._num_chi is not None
        return self._num_chi

    @property
    def max_length(self) -> int:
        """Lmax: the padded/truncated token count, ``num_chi + MODEL_MAX_LENGTH - 2``."""
        return self.num_chi + MODEL_MAX_LENGTH - 2

    def _offline(self) -> bool:
        if self.local_files_only is not None:
            return bool(self.local_files_only)
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")

    def _missing(self, reason: str) -> MissingTextEncoderError:
        repo = self.model if self._is_hub_id() else DEFAULT_TEXT_ENCODER
        return MissingTextEncoderError(
            f"The text encoder {self.model!r} (Gemma-2-2b-it, about 5 GB) is needed to embed a prompt that is not in "
            f"the embedding cache (the empty default prompt too), but {reason}. Either:\n"
            f"  - download it: `hf download {repo} --local-dir ./gemma-2-2b-it` (older huggingface_hub: "
            f"`huggingface-cli download {repo} --local-dir ./gemma-2-2b-it`) and pass that folder: "
            "--text-encoder ./gemma-2-2b-it on the command line, text_encoder= (PiDPipeline) or "
            "TextEncoder(model=...) in the API;\n"
            "  - allow downloads on first use: unset HF_HUB_OFFLINE (API: TextEncoder(local_files_only=False));\n"
            '  - or embed the prompt where Gemma is available with `pid-decoder embed "your prompt" -o '
            "emb.safetensors` and pass that file: --text-embedding emb.safetensors on the command line, "
            "text_embedding= in the API."
        )

    def _load(self) -> None:
        if self._tokenizer is None or self._decoder is None:
            self._load_from_pretrained()
        self._prepare()

    def _load_from_pretrained(self) -> None:
        folder = Path(self.model).expanduser()
        if not folder.is_dir() and not self._is_hub_id():
            raise self._missing(f"the folder {str(folder)!r} does not exist")
        offline = self._offline()
        source = str(folder) if folder.is_dir() else self.model
        if not offline and not folder.is_dir():
            offline = self._hub_unreachable()
        logger.info(
            "loading text encoder %s (%s) on %s%s", source, str(self.dtype), self.device, " offline" if offline else ""
        )
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"local_files_only": offline}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        # transformers renamed torch_dtype to dtype in 4.56.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        try:
            tokenizer = self._tokenizer
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
                tokenizer.padding_side = "right"  # parity: as the reference sets after loading
            if self._decoder is None:
                lm = AutoModelForCausalLM.from_pretrained(source, **{dtype_kw: self.dtype}, **kwargs)
                self._decoder = lm.get_decoder()  # Gemma2Model: embeddings + layers + final norm, no LM head
                del lm
                self._owns_model = True
        except OSError as exc:
            where = "offline mode is on and it is not in the local Hugging Face cache" if offline else "loading failed"
            raise self._missing(f"{where} ({exc})") from exc
        self._tokenizer = tokenizer
        self._identity = None  # the commit is known now that the files are in the HF cache

    def _hub_unreachable(self) -> bool:
        """One short probe of the hub before transformers asks it for every file (and retries each, for
        minutes, without a network). Unreachable: load from the HF cache, or fail at once if it is not there."""
        from huggingface_hub import try_to_load_from_cache

        try:
            weights._hub_probe(self.model, "config.json")  # looked up on the module: tests stand in for the hub
        except weights.HubUnreachable as err:
            try:
                cached = try_to_load_from_cache(self.model, "config.json", revision=self.revision)
            except (ValueError, OSError):
                cached = None
            if not isinstance(cached, str):
                raise self._missing(
                    f"the hub could not be reached ({err}) and it is not in the local Hugging Face cache"
                ) from None
            logger.info("the hub could not be reached (%s): loading %s from the local cache", err, self.model)
            return True
        except Exception as err:  # an answer about the repo (404, gated): transformers reports it in full below
            logger.debug("hub probe for %s: %s", self.model, err)
        return False

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._decoder.to(device=self.device, dtype=self.dtype)
        self._decoder.eval()
        self._decoder.requires_grad_(False)
        # parity: the reference counts the CHI tokens with tokenizer.encode (special tokens added, so
        # <bos> included) and derives Lmax = num_chi + 300 - 2 from it.
        self._num_chi = len(self._tokenizer.encode(CHI_PROMPT))
        self._prepared = True

    def unload(self) -> None:
        """Free Gemma. Objects passed as ``tokenizer=``/``decoder=`` stay (the caller owns them)."""
        if self._owns_model:
            self._decoder = None
            self._tokenizer = None
            self._owns_model = False
            self._num_chi = None
        self._prepared = False
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    # -- encoding ---------------------------------------------------------------------------------

    def needs_model(self, prompts: str | Sequence[str]) -> bool:
        """True when embedding ``prompts`` would load Gemma: it is not loaded and some prompt is not in the cache.

        Reads only the cache's file names and metadata (no model, no network), so a caller can list Gemma among
        the files a run needs before loading anything (`weights.check_run_files(needs_text_encoder=...)`).
        """
        prompts = _check_prompts(prompts)
        if self.loaded:
            return False
        if self._cache is None:
            return True
        identity = self.identity
        return any(self._cache.get(identity, p) is None for p in dict.fromkeys(prompts))

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Embed prompts (the CHI prefix is added here). Returns (B, 300, D) float32 on the CPU.

        Cached prompts are read from disk; the rest are encoded in one batch (loading Gemma if
        needed) and written to the cache. An empty prompt is valid (CHI only).
        """
        prompts = _check_prompts(prompts)
        found: dict[str, torch.Tensor] = {}
        if self._cache is not None:
            identity = self.identity
            for prompt in dict.fromkeys(prompts):
                emb = self._cache.get(identity, prompt)
                if emb is not None:
                    found[prompt] = emb
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        logger.debug("text embeddings: %d cached, %d to encode", len(found), len(missing))
        if missing:
            embs = self._encode_raw(missing)  # (M, T, D), Gemma's dtype
            identity = self.identity  # after loading: may now include the commit
            for prompt, emb in zip(missing, embs):
                if self._cache is not None:
                    self._cache.put(identity, prompt, emb)
                found[prompt] = emb.float()
        return torch.stack([found[p] for p in prompts])  # (B, T, D) float32

    def encode_negative(self, batch_size: int = 1) -> torch.Tensor:
        """`NEGATIVE_PROMPT` encoded like any prompt, repeated: (batch_size, 300, D) float32 on the CPU."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self.encode(NEGATIVE_PROMPT).expand(batch_size, -1, -1).contiguous()  # (B, T, D)

    def _encode_raw(self, prompts: list[str]) -> torch.Tensor:
        """The reference's ``_encode_text_raw`` without cache: (B, 300, D) in Gemma's dtype, on CPU."""
        self._load()
        lmax = self.max_length
        tokens = self._tokenizer(
            [CHI_PROMPT + p for p in prompts],  # parity: plain concatenation, no separator
            max_length=lmax,
            padding="max_length",
            truncation=True,
            padding_side="right",
            return_tensors="pt",
        )
        ids, mask = tokens["input_ids"], tokens["attention_mask"]  # (B, N) each
        assert ids.shape[1] == lmax, f"tokenizer returned {ids.shape[1]} positions, expected {lmax}"
        # parity: <bos> + the last 299 positions; for right-padded input these start at the caption.
        select = [0, *range(lmax - (MODEL_MAX_LENGTH - 1), lmax)]
        with torch.inference_mode():
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self._decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]  # (B, N, D)
            return hidden[:, select].to("cpu")  # (B, T, D)


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"every prompt must be a str, got element types {bad}")
    return list(prompts)


def _folder_fingerprint(folder: Path) -> str:
    """The HF snapshot commit if ``folder`` is one, else a hash of its files' names, sizes and times."""
    if folder.resolve().parent.name == "snapshots" and _COMMIT.match(folder.resolve().name):
        return folder.resolve().name
    entries = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in folder.iterdir() if p.is_file())
    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()[:16]
