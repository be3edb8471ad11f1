"""The Gradio page over an `Engine` (this module imports gradio; `pid_decoder.ui` imports it only on use).

    app = WebApp(Engine(ServeOptions(preset="flux-4k")))
    url = app.start(host="127.0.0.1", port=7860)     # returns once the page is served
    ...
    app.close()                                       # stops the server, deletes uploads and results

One job runs at a time (every job event shares one concurrency slot, and the engine holds a device lock); the
queue shows each waiting job its position. Uploads, results and gradio's cache live in one temporary folder
that `close` deletes. Errors reach the page as one sentence (`gr.Error`); anything unexpected is logged with
its traceback on the server and shown as its first line. One `WebApp` per process at a time: gradio reads its
temporary folder from the environment.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from .engine import NATIVE, Cancelled, Engine, InputError, JobResult, _one_line

logger = logging.getLogger(__name__)

KEEP_JOBS = 8  # result folders kept on disk (older ones are deleted; gradio's cache keeps what the page shows)
CACHE_CLEANUP = (600, 3 * 3600)  # gradio deletes cached uploads and results every 10 min once 3 h old
SIZES = [("native: scale × input", NATIVE), "1024", "2048", "3072", "4096"]

CSS = """
#pid-header h1 {margin-bottom: 0}
.pid-settings ul {margin: 0; padding-left: 1em; font-size: 0.9em}
.pid-note {font-size: 0.85em}
"""


def _refusal(message: str) -> gr.Error:
    """The one-sentence message the page shows (gradio prints no traceback for it; we log it ourselves)."""
    return gr.Error(message, title="PiD", print_exception=False)


def _image_input(**kwargs) -> gr.Image:
    """gr.Image whose unreadable uploads fail with a sentence instead of gradio's bare "Error".

    The check wraps this one component's ``preprocess`` (gradio writes a .pyi next to any module that defines a
    component subclass, so we do not subclass)."""
    image = gr.Image(**kwargs)
    plain = image.preprocess

    def preprocess(payload):
        try:
            return plain(payload)
        except gr.Error:
            raise
        except Exception:  # PIL raises many types for files that are not images
            name = getattr(payload, "orig_name", None) or "the upload"
            logger.info("unreadable image upload %s", name)
            raise _refusal(f"{name} is not an image this page can read; upload a PNG, JPEG, WebP, BMP, TIFF or "
                           "GIF file.") from None

    image.preprocess = preprocess
    return image


class _Jobs:
    """Cancel flags of the running jobs, by browser session."""

    def __init__(self):
        self._lock = threading.Lock()
        self._flags: dict[str, list[threading.Event]] = {}

    @contextlib.contextmanager
    def track(self, session: str):
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(session, []).append(flag)
        try:
            yield flag
        finally:
            with self._lock:
                flags = self._flags.get(session, [])
                if flag in flags:
                    flags.remove(flag)
                if not flags:
                    self._flags.pop(session, None)

    def cancel(self, session: str) -> int:
        with self._lock:
            flags = list(self._flags.get(session, []))
        for flag in flags:
            flag.set()
        return len(flags)


def _escape(text: Any) -> str:
    return re.sub(r"([\\`*_\[\]|<>#])", r"\\\1", str(text)).replace("\n", " ")


def settings_markdown(settings: dict[str, str]) -> str:
    return "\n".join(f"- **{_escape(k)}**: {_escape(v)}" for k, v in settings.items())


class WebApp:
    """The page, its server and its temporary folder.

    Args:
        engine: the models and jobs.
        max_queue: jobs that may wait; more are refused with a message.
        title: browser tab title.
    """

    def __init__(self, engine: Engine, *, max_queue: int = 16, title: str = "PiD decoder"):
        self.engine = engine
        self.max_queue = int(max_queue)
        self._tmp = Path(tempfile.mkdtemp(prefix="pid-serve-"))
        self._outputs = self._tmp / "results"
        self._outputs.mkdir()
        self._env_before = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self._tmp / "gradio")  # uploads and gradio's cache go here
        self._jobs = _Jobs()
        self._job_folders: list[Path] = []
        self._folders_lock = threading.Lock()
        self._closed = False
        self.url: str | None = None
        self.blocks = self._build(title)

    # ------------------------------------------------------------------ page
    def _build(self, title: str) -> gr.Blocks:
        engine = self.engine
        choices = [(e.label, e.key) for e in engine.models.values()]
        first = engine.first if engine.first in engine.models else (choices[0][1] if choices else None)
        ldm_ok, ldm_note = engine.ldm_status(first) if first else (False, "No model is offered.")
        ldm = engine.ldm_defaults(first) if first else None
        with gr.Blocks(title=title, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as blocks:
            gr.Markdown(
                "# PiD: Pixel Diffusion Decoder\n"
                "Upscale an image or decode a latent to 2K–4K pixels with the pixel-space diffusion decoder. "
                "Jobs run one at a time; the queue shows your place.",
                elem_id="pid-header",
            )
            with gr.Row(equal_height=True):
                model = gr.Dropdown(choices, value=first, label="Model", scale=1, min_width=260, elem_id="pid-model",
                                    info="switching unloads the previous model; the next run loads this one")
                with gr.Column(scale=1):
                    gr.Markdown(self._models_note(), elem_id="pid-models-note", elem_classes="pid-note")
                    if engine.missing:
                        with gr.Accordion(f"{len(engine.missing)} more presets: how to get them", open=False):
                            gr.Markdown(engine.missing_note(), elem_classes="pid-note")
            with gr.Tabs():
                with gr.Tab("Upscale", id="upscale"):
                    with gr.Row():
                        with gr.Column(scale=2, min_width=320):
                            image = _image_input(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                                 label="Image (upload, drop or paste)", height=280,
                                                 elem_id="upscale-image")
                            prompt, embedding = self._text_inputs("upscale")
                            with gr.Row():
                                seed = gr.Number(5, precision=0, minimum=0, label="Seed", elem_id="upscale-seed")
                                sigma = gr.Slider(0.0, 1.0, 0.0, step=0.01, label="σ: noise the latent first",
                                                  elem_id="upscale-sigma")
                            size = gr.Dropdown(SIZES, value=NATIVE, allow_custom_value=True,
                                               label="Output size (long side, px)", elem_id="upscale-size")
                            with gr.Row():
                                run = gr.Button("Upscale", variant="primary", elem_id="upscale-run")
                                stop = gr.Button("Cancel", variant="stop", elem_id="upscale-cancel")
                        with gr.Column(scale=3):
                            up_out = self._outputs_column("upscale", "Before: input resized | after: PiD")
                    up_event = run.click(
                        self.run_upscale, [model, image, prompt, embedding, seed, sigma, size], up_out,
                        api_name="upscale", concurrency_limit=1, concurrency_id="device",
                    )
                    stop.click(self.cancel, None, None, cancels=[up_event], queue=False, api_visibility="private")
                with gr.Tab("Decode", id="decode"):
                    with gr.Row():
                        with gr.Column(scale=2, min_width=320):
                            latent = gr.File(label="Latent (.safetensors key 'latent', .pt, .npy; (1, C, h, w))",
                                             file_types=[".safetensors", ".pt", ".pth", ".npy"], type="filepath",
                                             elem_id="decode-latent")
                            d_prompt, d_embedding = self._text_inputs("decode")
                            with gr.Row():
                                d_seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="decode-seed")
                                d_sigma = gr.Slider(0.0, 1.0, 0.0, step=0.01, label="σ of the latent (0 = clean)",
                                                    elem_id="decode-sigma")
                            with gr.Row():
                                d_run = gr.Button("Decode", variant="primary", elem_id="decode-run")
                                d_stop = gr.Button("Cancel", variant="stop", elem_id="decode-cancel")
                        with gr.Column(scale=3):
                            d_out = self._outputs_column("decode", "Before: the VAE's own decode | after: PiD")
                    d_event = d_run.click(
                        self.run_decode, [model, latent, d_prompt, d_embedding, d_seed, d_sigma], d_out,
                        api_name="decode", concurrency_limit=1, concurrency_id="device",
                    )
                    d_stop.click(self.cancel, None, None, cancels=[d_event], queue=False, api_visibility="private")
                with gr.Tab("Generate", id="generate"):
                    g_note = gr.Markdown(ldm_note, elem_id="generate-note")
                    with gr.Row():
                        with gr.Column(scale=2, min_width=320):
                            g_prompt = gr.Textbox(label="Prompt", lines=3, elem_id="generate-prompt")
                            with gr.Accordion("Caption for PiD (optional; default: Gemma encodes the prompt)",
                                              open=False):
                                g_embedding = gr.File(label="a prompt embedding file from `pid-decoder embed`",
                                                      file_types=[".safetensors"], type="filepath",
                                                      elem_id="generate-embedding")
                            with gr.Row():
                                g_res = gr.Textbox("2048", label="Final resolution (N or W,H)",
                                                   elem_id="generate-resolution")
                                g_seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="generate-seed")
                            with gr.Row():
                                g_steps = gr.Number(ldm.steps if ldm else None, precision=0, minimum=1,
                                                    label="LDM steps", elem_id="generate-steps")
                                g_guidance = gr.Number(ldm.guidance if ldm else None, minimum=0, label="Guidance",
                                                       elem_id="generate-guidance")
                            with gr.Row():
                                g_run = gr.Button("Generate", variant="primary", interactive=ldm_ok,
                                                  elem_id="generate-run")
                                g_stop = gr.Button("Cancel", variant="stop", elem_id="generate-cancel")
                        with gr.Column(scale=3):
                            g_out = self._outputs_column("generate", "Before: the LDM's VAE decode | after: PiD")
                    g_event = g_run.click(
                        self.run_generate, [model, g_prompt, g_embedding, g_res, g_seed, g_steps, g_guidance], g_out,
                        api_name="generate", concurrency_limit=1, concurrency_id="device",
                    )
                    g_stop.click(self.cancel, None, None, cancels=[g_event], queue=False, api_visibility="private")
            model.change(self._model_changed, model, [g_note, g_run, g_steps, g_guidance], queue=False,
                         api_visibility="private")
        return blocks

    def _text_inputs(self, tab: str):
        default = "the server's embedding file" if self.engine.options.text_embedding else "the empty prompt"
        with gr.Accordion(f"Caption for PiD (optional; default {default})", open=False, elem_id=f"{tab}-text"):
            prompt = gr.Textbox(label="Prompt (needs the Gemma-2 text encoder on the server)", lines=1,
                                elem_id=f"{tab}-prompt")
            embedding = gr.File(label="…or a prompt embedding file from `pid-decoder embed`",
                                file_types=[".safetensors"], type="filepath", elem_id=f"{tab}-embedding")
        return prompt, embedding

    @staticmethod
    def _outputs_column(tab: str, label: str) -> list:
        slider = gr.ImageSlider(label=label, type="filepath", interactive=False, max_height=560,
                                buttons=["fullscreen"], elem_id=f"{tab}-slider")
        with gr.Row():
            files = gr.File(label="Full-resolution PNG", interactive=False, file_count="multiple",
                            elem_id=f"{tab}-file", scale=1)
            settings = gr.Markdown(elem_id=f"{tab}-settings", elem_classes="pid-settings")
        return [slider, files, settings]

    def _models_note(self) -> str:
        from ..devices import resolve_device

        opts = self.engine.options
        limits = (f"Uploads up to {opts.max_upload_mb:g} MB, outputs up to {opts.max_output_pixels / 1e6:.1f} MP.")
        try:
            device = str(resolve_device(opts.device))
        except ValueError:
            device = opts.device
        return f"Device: {device}. {limits}"

    def _model_changed(self, key: str):
        """The Generate tab follows the model: what it runs with (or lacks) and that LDM's defaults."""
        ok, note = self.engine.ldm_status(key) if key else (False, "Choose a model.")
        ldm = self.engine.ldm_defaults(key) if key else None
        steps, guidance = (ldm.steps, ldm.guidance) if ldm else (None, None)
        return note, gr.Button(interactive=ok), steps, guidance

    # ------------------------------------------------------------------ jobs
    def cancel(self, request: gr.Request) -> None:
        """Stop this browser session's running job at its next step (queued ones gradio drops itself)."""
        if self._jobs.cancel(getattr(request, "session_hash", None) or ""):
            logger.info("cancel requested by session %s", request.session_hash)

    def run_upscale(self, model, image, prompt, embedding, seed, sigma, size, request: gr.Request,
                    progress=gr.Progress()):  # noqa: B008 (gradio injects the tracker it finds as a default)
        return self._job(request, progress, lambda step, _: self.engine.upscale(
            model, image, prompt=prompt, embedding=embedding, seed=seed, sigma=sigma, size=size, on_step=step))

    def run_decode(self, model, latent, prompt, embedding, seed, sigma, request: gr.Request,
                   progress=gr.Progress()):  # noqa: B008
        return self._job(request, progress, lambda step, _: self.engine.decode(
            model, latent, prompt=prompt, embedding=embedding, seed=seed, sigma=sigma, on_step=step))

    def run_generate(self, model, prompt, embedding, resolution, seed, ldm_steps, guidance, request: gr.Request,
                     progress=gr.Progress()):  # noqa: B008
        return self._job(request, progress, lambda step, ldm_step: self.engine.generate(
            model, prompt, resolution=resolution, seed=seed, ldm_steps=ldm_steps, guidance=guidance,
            embedding=embedding, on_step=step, on_ldm_step=ldm_step))

    def _job(self, request, progress, work):
        session = getattr(request, "session_hash", None) or uuid.uuid4().hex
        with self._jobs.track(session) as flag:

            def stepper(desc: str):
                def step(done: int, total: int) -> None:
                    if flag.is_set():
                        raise Cancelled(f"cancelled after {desc} step {done} of {total}")
                    if total:
                        progress((done, total), desc=desc, unit="steps")
                    else:
                        progress(0.0, desc="starting (loads the model if it changed)")

                return step

            try:
                progress(0.0, desc="waiting for the device")
                result = work(stepper("PiD"), stepper("LDM"))
                return self._present(result)
            except Cancelled:
                raise _refusal("Cancelled; the job stopped at its next step.") from None
            except gr.Error:
                raise
            except (InputError, ValueError, FileNotFoundError) as err:
                logger.info("refused: %s", _one_line(err))
                raise _refusal(self._clean(_one_line(err))) from None
            except Exception as err:  # a bug or an out-of-memory: the server log has the traceback
                logger.exception("job failed")
                raise _refusal(f"The job failed: {type(err).__name__}: {self._clean(_one_line(err))}") from None

    def _clean(self, message: str) -> str:
        """Server-side temporary paths in a message -> the file's name."""
        return re.sub(re.escape(str(self._tmp)) + r"[^\s'\"]*/", "", message)

    def _present(self, result: JobResult):
        from ..io import save_image

        folder = self._job_folder()
        after = save_image(result.image, folder / f"{result.name}.png")
        before = save_image(result.before, folder / f"{result.name}_before.png")
        files = [str(after)] + [
            str(save_image(image, folder / f"{result.name}_{label}.png")) for label, image in result.extra.items()
        ]
        return (str(before), str(after)), files, settings_markdown(result.settings)

    def _job_folder(self) -> Path:
        folder = self._outputs / uuid.uuid4().hex
        folder.mkdir()
        with self._folders_lock:
            self._job_folders.append(folder)
            while len(self._job_folders) > KEEP_JOBS:  # the page shows gradio's cached copies
                shutil.rmtree(self._job_folders.pop(0), ignore_errors=True)
        return folder

    # ------------------------------------------------------------------ server
    def start(self, host: str = "127.0.0.1", port: int | None = None, *, auth: list[tuple[str, str]] | None = None):
        """Serve the page (in background threads); returns its local URL once it answers."""
        opts = self.engine.options
        self.blocks.queue(default_concurrency_limit=1, max_size=self.max_queue)
        _, url, _ = self.blocks.launch(
            server_name=host, server_port=port, auth=auth or None, share=False, show_error=False,
            prevent_thread_lock=True, quiet=True, inbrowser=False, max_file_size=int(opts.max_upload_mb * 1e6),
            allowed_paths=[str(self._outputs)], ssr_mode=False, pwa=False, mcp_server=False,
            enable_monitoring=False, run_history=False, footer_links=["api", "settings"], css=CSS,
            auth_message="PiD decoder: sign in with the user and password the server was started with.",
        )
        self.url = url
        return url

    def close(self) -> None:
        """Stop the server and delete every upload and result."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # gradio prints "Closing server ..." on stdout
                self.blocks.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
            if self._env_before is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._env_before

    def __enter__(self) -> WebApp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
