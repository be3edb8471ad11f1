"""The web app (`pid-decoder serve`) on CPU with tiny random models: the engine's jobs and refusals, the CLI
options, login, and a soak of the real server process. The browser checks are in test_ui_browser.py."""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pid_decoder import cli

from .test_pipeline_support import (
    TINY_ALIAS,
    FakeHub,
    make_assets,
    random_image,
    register_presets,
    tiny_flux_pipeline,
)
from .ui_support import checkpoint_options, free_port, preset_options, running_app

pytest.importorskip("diffusers")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ui-assets"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Weight lookups see an empty fake hub; the text cache lives in tmp."""
    from pid_decoder import weights

    monkeypatch.setattr(weights, "_hub_download", FakeHub(tmp_path / "empty-hub"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PID_WEIGHTS_DIR", raising=False)


@pytest.fixture
def engine(assets):
    from pid_decoder.ui import Engine

    eng = Engine(checkpoint_options(assets))
    eng.prepare()
    yield eng
    eng.close()


def save(image, path: Path) -> Path:
    image.save(path)
    return path


def run_cli(*argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- models on offer
def test_menu_lists_only_presets_with_weights(assets, monkeypatch):
    from pid_decoder.ui import Engine

    register_presets(monkeypatch)
    eng = Engine(preset_options(assets))
    assert list(eng.models) == [TINY_ALIAS, "tiny-flux-teacher"]  # both checkpoints are in the weights folder
    assert "flux-4k" in eng.missing and "pixeldit-4k" not in eng.models
    assert "--preset NAME" in eng.missing_note() and "flux-4k" in eng.missing_note()
    assert eng.first == TINY_ALIAS and eng.loaded is None  # nothing loads before prepare()


def test_prepare_with_missing_weights_lists_them(tmp_path):
    from pid_decoder.ui import Engine, ServeOptions
    from pid_decoder.weights import MissingWeightsError

    eng = Engine(ServeOptions(preset="flux-4k", weights_dir=str(tmp_path), device="cpu"))
    with pytest.raises(MissingWeightsError, match=r"model_ema_bf16\.pth"):
        eng.prepare()


# --------------------------------------------------------------------------- jobs
def test_upscale_native_size_progress_and_settings(engine, tmp_path):
    steps = []
    result = engine.upscale("checkpoint", save(random_image(34, 50), tmp_path / "in.png"), seed=5,
                            on_step=lambda d, t: steps.append((d, t)))
    assert result.image.size == (128, 192)  # 4x the centre crop 32x48
    assert result.before.size == result.image.size and result.before.mode == "RGB"
    assert steps == [(0, 0), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.settings["output"].startswith("128x192") and result.settings["seed"] == "5"
    assert "emb.safetensors" in result.settings["text"]


def test_upscale_matches_the_pipeline(engine, assets, tmp_path):
    """The page's result is the library's: same image for the same seed."""
    from pid_decoder.text import load_text_embedding

    image = random_image(32, 32, seed=4)
    result = engine.upscale("checkpoint", save(image, tmp_path / "in.png"), seed=7, sigma=0.2)
    pipe = engine._pipe[1]
    emb, _ = load_text_embedding(assets["embedding"])
    expected = pipe.upscale(image, text_embedding=emb, seed=7, sigma=0.2)[0]
    assert np.array_equal(np.asarray(result.image), np.asarray(expected))


def test_upscale_to_a_chosen_long_side(engine, tmp_path):
    result = engine.upscale("checkpoint", save(random_image(40, 30), tmp_path / "in.png"), size="256")
    assert result.image.size == (256, 192)  # input resized to 64x48, then 4x


def test_decode_latent_files(engine, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 2, 3, generator=g)
    files = [tmp_path / "z.npy", tmp_path / "z.pt", tmp_path / "z.safetensors"]
    np.save(files[0], latent.numpy())
    torch.save({"latent": latent}, files[1])
    save_file({"latent": latent}, files[2])
    images = []
    for path in files:
        result = engine.decode("checkpoint", path, seed=3)
        assert result.image.size == (96, 64) and result.before.size == (96, 64)
        images.append(np.asarray(result.image))
    assert all(np.array_equal(images[0], other) for other in images[1:])


def test_model_stays_loaded_and_switching_unloads(assets, monkeypatch, tmp_path):
    from pid_decoder.ui import Engine

    register_presets(monkeypatch)
    eng = Engine(preset_options(assets))
    eng.prepare()
    first = weakref.ref(eng._pipe[1])
    image = save(random_image(16, 16), tmp_path / "in.png")
    eng.upscale(TINY_ALIAS, image)
    eng.upscale(TINY_ALIAS, image)
    assert eng._pipe[1] is first()  # kept between jobs
    eng.upscale("tiny-flux-teacher", image)  # the undistilled sampler with the negative embedding file
    gc.collect()
    assert eng.loaded == "tiny-flux-teacher" and first() is None  # the previous model is gone


def test_cancel_stops_at_the_next_step_and_the_engine_keeps_working(engine, tmp_path):
    from pid_decoder.ui import Cancelled

    seen = []

    def step(done, total):
        seen.append(done)
        if done == 2:
            raise Cancelled("stop")

    image = save(random_image(16, 16), tmp_path / "in.png")
    with pytest.raises(Cancelled):
        engine.upscale("checkpoint", image, on_step=step)
    assert seen == [0, 1, 2]
    assert engine.upscale("checkpoint", image).image.size == (64, 64)  # the device lock was released


def test_generate_with_a_diffusers_pipeline(assets, tmp_path):
    from pid_decoder.ui import Engine

    eng = Engine(checkpoint_options(assets), ldm_pipeline=tiny_flux_pipeline())
    eng.prepare()
    ok, note = eng.ldm_status("checkpoint")
    assert ok and "28 steps" in note
    ldm_steps, pid_steps = [], []
    result = eng.generate("checkpoint", "a red fox", resolution="128", ldm_steps=2, embedding=assets["embedding"],
                          on_step=lambda d, t: pid_steps.append(d), on_ldm_step=lambda d, t: ldm_steps.append((d, t)))
    assert result.image.size == (128, 128) and result.before.size == (128, 128)
    assert ldm_steps == [(1, 2), (2, 2)] and pid_steps[-1] == 4
    assert "2 steps" in result.settings["ldm"]


def test_generate_tab_says_what_is_missing(engine):
    from pid_decoder.ui import InputError

    ok, note = engine.ldm_status("checkpoint")
    assert not ok and "black-forest-labs/FLUX.1-dev" in note and "--ldm-model" in note
    with pytest.raises(InputError, match=r"FLUX\.1-dev"):
        engine.generate("checkpoint", "a fox")


# --------------------------------------------------------------------------- refusals: one sentence each
def _bad_requests(tmp: Path, assets) -> dict:
    from safetensors.torch import save_file

    (tmp / "notes.txt").write_text("hello")
    (tmp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    save(random_image(8, 8), tmp / "tiny.png")
    save(random_image(32, 32), tmp / "ok.png")
    np.save(tmp / "sdxl.npy", np.zeros((1, 4, 4, 4), np.float32))
    np.save(tmp / "batch.npy", np.zeros((2, 16, 4, 4), np.float32))
    np.save(tmp / "nan.npy", np.full((1, 16, 4, 4), np.nan, np.float32))
    np.save(tmp / "ints.npy", np.zeros((1, 16, 4, 4), np.int64))
    save_file({"text_embedding": torch.zeros(8, 7)}, tmp / "narrow.safetensors")
    ok = tmp / "ok.png"
    return {
        "unsupported file": ("upscale", dict(image_path=tmp / "notes.txt"), "unsupported file type .txt"),
        "unreadable image": ("upscale", dict(image_path=tmp / "broken.png"), "not an image this page can read"),
        "image too small": ("upscale", dict(image_path=tmp / "tiny.png"), "at least 16x16"),
        "size not a multiple": ("upscale", dict(image_path=ok, size="1000"), "multiple of 64 (inputs are multiples"),
        "size not a number": ("upscale", dict(image_path=ok, size="big"), "long side in pixels"),
        "output too large": ("upscale", dict(image_path=ok, size="4096"), "--max-output-pixels"),
        "sigma out of range": ("upscale", dict(image_path=ok, sigma=1.5), "from 0 (clean latent) to 1"),
        "negative seed": ("upscale", dict(image_path=ok, seed=-1), "Seed must be"),
        "prompt and embedding": ("upscale", dict(image_path=ok, prompt="x", embedding=assets["embedding"]), "not both"),
        "embedding too narrow": ("upscale", dict(image_path=ok, embedding=tmp / "narrow.safetensors"), "7-wide"),
        "no upload": ("decode", dict(latent_path=None), "Upload a latent file first"),
        "wrong channels": ("decode", dict(latent_path=tmp / "sdxl.npy"), "4 channels"),
        "several latents": ("decode", dict(latent_path=tmp / "batch.npy"), "one at a time"),
        "nan latent": ("decode", dict(latent_path=tmp / "nan.npy"), "NaN"),
        "integer latent": ("decode", dict(latent_path=tmp / "ints.npy"), "floating point"),
        "unknown model": ("decode", dict(latent_path=tmp / "sdxl.npy", key="flux-9k"), "not offered"),
    }


def test_bad_requests_are_refused_with_one_sentence(assets, tmp_path):
    from pid_decoder.ui import Engine, InputError

    eng = Engine(checkpoint_options(assets, max_output_pixels=1024 * 1024, max_upload_mb=1))
    eng.prepare()
    for name, (job, kwargs, expected) in _bad_requests(tmp_path, assets).items():
        kwargs = dict(kwargs)
        key = kwargs.pop("key", "checkpoint")
        with pytest.raises(InputError) as info:
            getattr(eng, job)(key, **kwargs)
        message = str(info.value)
        assert expected in message, name
        assert "\n" not in message and str(tmp_path) not in message and "Traceback" not in message, name
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 1_100_000)
    with pytest.raises(InputError, match=r"1.1 MB, over this server's upload limit of 1 MB"):
        eng.upscale("checkpoint", big)
    assert eng.upscale("checkpoint", tmp_path / "ok.png").image.size == (128, 128)  # still serving


# --------------------------------------------------------------------------- the page's wiring (no browser)
def test_jobs_share_one_device_slot_and_cancel_is_not_queued(engine):
    pytest.importorskip("gradio")
    from pid_decoder.ui import WebApp

    app = WebApp(engine)
    try:
        fns = {f.api_name: f for f in app.blocks.fns.values()}
        for name in ("upscale", "decode", "generate"):
            assert fns[name].concurrency_limit == 1 and fns[name].concurrency_id == "device", name
        cancels = [f for f in app.blocks.fns.values() if f.fn is not None and getattr(f.fn, "__name__", "") == "cancel"]
        assert len(cancels) == 3 and not any(f.queue for f in cancels)
    finally:
        app.close()


def test_cancel_button_stops_this_sessions_job(engine, tmp_path):
    pytest.importorskip("gradio")
    import gradio as gr

    from pid_decoder.ui import WebApp

    class Request:
        session_hash = "abc"

    app = WebApp(engine)
    image = save(random_image(16, 16), tmp_path / "in.png")
    calls = []

    def progress(value, desc=None, unit=None):
        calls.append((value, desc))
        if value == (1, 4):  # the person presses Cancel while step 2 runs
            app.cancel(Request())

    try:
        with pytest.raises(gr.Error, match="Cancelled"):
            app.run_upscale("checkpoint", str(image), "", None, 5, 0.0, "native", Request(), progress)
        assert calls[-1] == ((1, 4), "PiD")  # stopped after the step that was running
        (_, after), files, settings = app.run_upscale("checkpoint", str(image), "", None, 5, 0.0, "native",
                                                      Request(), lambda *a, **k: None)
        assert Image.open(after).size == (64, 64) and files == [after] and "**output**" in settings
    finally:
        app.close()
    assert not Path(after).exists()  # close() deleted the results


# --------------------------------------------------------------------------- command line
SERVE_OPTIONS = ["--preset", "--checkpoint", "--config", "--weights-dir", "--backbone", "--backbone-path",
                 "--text-embedding", "--text-encoder", "--device", "--dtype", "--host", "--port", "--auth",
                 "--auth-file", "--no-auth", "--max-upload-mb", "--max-output-pixels", "--max-queue", "--ldm-model"]


def test_serve_help_documents_every_option(capsys):
    code, out, _ = run_cli("serve", "--help", capsys=capsys)
    assert code == 0 and "usage: pid-decoder serve" in out
    for option in SERVE_OPTIONS:
        assert option in out, option


def test_serve_without_gradio_says_how_to_install(assets, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    code, _, err = run_cli("serve", "--checkpoint", assets["checkpoint"], "--config", assets["config"],
                           "--backbone", "flux", "--device", "cpu", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and 'pip install "pid-decoder[ui]"' in err


@pytest.mark.parametrize("extra, expected", [
    (["--host", "0.0.0.0"], "--auth USER:PASS"),
    (["--host", "192.168.1.5", "--auth", "nopassword"], "USER:PASS"),
    (["--auth-file", "/nonexistent/logins.txt"], "--auth-file"),
    (["--host", "0.0.0.0", "--auth", "a:b", "--no-auth"], "contradicts"),
    (["--max-output-pixels", "huge"], "WxH"),
    (["--port", "70000"], "1..65535"),
])
def test_serve_usage_errors(assets, capsys, extra, expected):
    code, out, err = run_cli("serve", "--checkpoint", assets["checkpoint"], "--config", assets["config"],
                             "--backbone", "flux", "--device", "cpu", *extra, capsys=capsys)
    assert code == 2 and expected in err and out == ""


def test_busy_port_is_one_line(assets, capsys):
    pytest.importorskip("gradio")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli("serve", "--checkpoint", assets["checkpoint"], "--config", assets["config"],
                                 "--backbone", "flux", "--backbone-path", assets["vae"], "--device", "cpu",
                                 "--port", port, "-q", capsys=capsys)
    assert code == 1 and out == "" and err.strip() == (
        f"pid-decoder serve: error: cannot listen on 127.0.0.1:{port} (in use, or not an address of this machine); "
        "choose another --port or --host")


def test_importing_the_package_does_not_import_gradio():
    code = ("import sys, pid_decoder, pid_decoder.cli, pid_decoder.ui; pid_decoder.cli.build_parser(); "
            "import pid_decoder.ui.engine; assert 'gradio' not in sys.modules, 'gradio imported'")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- login
def test_login_is_required_with_auth(engine, tmp_path):
    pytest.importorskip("gradio")
    import httpx
    from gradio_client import Client, handle_file

    image = save(random_image(16, 16), tmp_path / "in.png")
    with running_app(engine, auth=[("ada", "lovelace")]) as (_, url):
        for path in ("config", "gradio_api/info"):
            assert httpx.get(url + path, timeout=10).status_code == 401, path
        join = {"data": [], "fn_index": 0, "session_hash": "x"}
        assert httpx.post(url + "gradio_api/queue/join", json=join, timeout=10).status_code == 401
        upload = httpx.post(url + "gradio_api/upload", files={"files": ("in.png", image.read_bytes())}, timeout=10)
        assert upload.status_code == 401
        bad = httpx.post(url + "login", data={"username": "ada", "password": "babbage"}, timeout=10)
        assert bad.status_code == 400
        with pytest.raises(Exception, match="credentials"):
            Client(url, verbose=False)
        client = Client(url, auth=("ada", "lovelace"), verbose=False)
        result = client.predict("checkpoint", handle_file(str(image)), "", None, 5, 0.0, "native", api_name="/upscale")
        assert Image.open(result[1][0]).size == (64, 64)


def test_generate_through_the_server(assets):
    """The Generate tab's API: prompt -> tiny FLUX pipeline -> PiD, the LDM's own decode as the comparison."""
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from pid_decoder.ui import Engine

    eng = Engine(checkpoint_options(assets), ldm_pipeline=tiny_flux_pipeline())
    eng.prepare()
    with running_app(eng) as (_, url):
        client = Client(url, verbose=False)
        (before, after), files, settings = client.predict(
            "checkpoint", "a red fox", handle_file(str(assets["embedding"])), "128,64", 3, 2, 3.5,
            api_name="/generate")
    assert Image.open(after).size == (128, 64) and Image.open(before).size == (128, 64)
    assert len(files) == 1 and "2 steps, guidance 3.5, seed 3" in settings


def _join_and_listen(url: str, fn_index: int, data: list, joined: list | None = None) -> list[dict]:
    """One browser session's view of a job: gradio's queue protocol (join, then the event stream)."""
    import json
    import uuid

    import httpx

    session = uuid.uuid4().hex
    join = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
    assert httpx.post(url + "gradio_api/queue/join", json=join, timeout=30).status_code == 200
    if joined is not None:
        joined.append(session)
    messages = []
    with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if messages[-1].get("msg") == "process_completed":
                    break
    return messages


def test_queue_position_and_step_progress_reach_the_page(engine, tmp_path):
    """Three jobs while the device is busy: the waiting ones are told their place, each sees its PiD steps."""
    pytest.importorskip("gradio")
    import httpx

    image = save(random_image(16, 16), tmp_path / "in.png")
    with running_app(engine) as (app, url):
        fn_index = next(i for i, f in app.blocks.fns.items() if f.api_name == "upscale")
        uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("in.png", image.read_bytes())},
                              timeout=30).json()[0]
        data = ["checkpoint", {"path": uploaded, "orig_name": "in.png", "meta": {"_type": "gradio.FileData"}}, "",
                None, 5, 0.0, "native"]
        with ThreadPoolExecutor(3) as pool:
            joined = []
            with engine._device_lock:  # the device is busy until all three have joined the queue
                futures = [pool.submit(_join_and_listen, url, fn_index, data, joined) for _ in range(3)]
                deadline = time.monotonic() + 60
                while len(joined) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
            streams = [f.result(timeout=120) for f in futures]
    ranks = [m["rank"] for msgs in streams for m in msgs if m.get("msg") == "estimation" and m.get("rank") is not None]
    assert max(ranks) >= 1  # someone waited behind another job and was shown where
    for msgs in streams:
        steps = [(m["progress_data"][0]["index"], m["progress_data"][0]["length"]) for m in msgs
                 if m.get("msg") == "progress" and m["progress_data"][0].get("desc") == "PiD"]
        # gradio sends the latest state at its own pace, so fast steps may be merged; they never go backwards
        assert steps and steps == sorted(steps) and all(total == 4 for _, total in steps)
        assert msgs[-1]["msg"] == "process_completed" and msgs[-1]["success"]


def test_server_refuses_oversized_uploads(assets):
    pytest.importorskip("gradio")
    import httpx

    from pid_decoder.ui import Engine

    eng = Engine(checkpoint_options(assets, max_upload_mb=0.01))
    with running_app(eng) as (_, url):
        big = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", b"\0" * 20_000)}, timeout=10)
        small = httpx.post(url + "gradio_api/upload", files={"files": ("small.png", b"\0" * 2_000)}, timeout=10)
    assert big.status_code == 413 and small.status_code == 200


# --------------------------------------------------------------------------- soak: the real server process
def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _read_url(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("http"):
                return line.strip()
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"no URL on stdout within {timeout} s (exit status {proc.poll()})")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_soak_four_clients_twenty_requests(assets, tmp_path):
    """20 requests (every fifth a broken file) from 4 concurrent clients against `pid-decoder serve`."""
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PID_CACHE_DIR": str(tmp_path / "cache"), "GRADIO_ANALYTICS_ENABLED": "0"}
    env.pop("PID_WEIGHTS_DIR", None)
    port = free_port()
    cmd = [sys.executable, "-m", "pid_decoder.cli", "serve", "--checkpoint", assets["checkpoint"], "--config",
           assets["config"], "--backbone", "flux", "--backbone-path", assets["vae"], "--text-embedding",
           assets["embedding"], "--weights-dir", tmp_path / "none", "--device", "cpu", "--port", port, "-q"]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        url = _read_url(proc, timeout=180)
        good = [save(random_image(16 + 16 * (i % 3), 32, seed=i), tmp_path / f"in{i}.png") for i in range(3)]
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")

        def request(client, i):
            source = broken if i % 5 == 4 else good[i % 3]
            job = client.submit("checkpoint", handle_file(str(source)), "", None, i, 0.0, "native",
                                api_name="/upscale")
            try:
                result = job.result(timeout=120)
            except Exception as err:  # a refusal: gradio_client raises with the page's message
                return i, "refused", str(err)
            return i, "done", Image.open(result[1][0]).size

        first = request(Client(url, verbose=False), 0)
        assert first[1] == "done"
        rss_first = _rss_kb(proc.pid)

        def client_run(c):
            client = Client(url, verbose=False)
            return [request(client, 1 + c * 5 + k) for k in range(5)]

        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            outcomes = [o for batch in pool.map(client_run, range(4)) for o in batch]
        elapsed = time.monotonic() - start
        rss_after = _rss_kb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    print(f"soak: 20 requests in {elapsed:.1f} s; server RSS {rss_first / 1024:.0f} MB after the first job, "
          f"{rss_after / 1024:.0f} MB after the run")
    assert sorted(i for i, _, _ in outcomes) == list(range(1, 21))  # none lost
    for i, status, detail in outcomes:
        if i % 5 == 4:
            assert status == "refused" and "not an image this page can read" in detail, (i, detail)
        else:
            w = 16 + 16 * (i % 3)
            assert status == "done" and detail == (4 * w, 128), (i, detail)
    assert elapsed < 240
    assert rss_after <= 1.10 * rss_first, (rss_first, rss_after)
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert not list(tmp.glob("pid-serve-*")), "the server left its temporary folder behind"
    assert "Traceback" not in (tmp_path / "server.log").read_text()
