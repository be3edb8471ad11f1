"""The web app in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium): upload, upscale,
download, a bad file, a latent decode, and the screenshot of docs/ui.md.

Skipped, with the reason, only when Playwright or a Chromium cannot be found (scripts/install-browser.sh installs
one). ``PID_CHROMIUM`` names the browser binary; ``PID_UI_SCREENSHOT=docs/images/ui.png`` also writes the
screenshot there (how the one in the docs was made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_pipeline_support import TINY_ALIAS, FakeHub, make_assets, register_presets
from .ui_support import preset_options, running_app, scene

pytest.importorskip("gradio")
pytest.importorskip("diffusers")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

VIEWPORT = {"width": 1360, "height": 1080}
TIMEOUT_MS = 90_000  # a shared CI core can be slow; a result normally appears in a second


def find_chromium() -> str | None:
    candidates = [os.environ.get("PID_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome"), "/usr/bin/chromium"]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny presets served from a thread of this process (the menu shows preset names)."""
    from pid_decoder import weights
    from pid_decoder.ui import Engine

    root = tmp_path_factory.mktemp("ui-browser")
    assets = make_assets(root)
    with pytest.MonkeyPatch.context() as mp:
        register_presets(mp)
        mp.setattr(weights, "_hub_download", FakeHub(root / "empty-hub"))
        mp.setenv("PID_CACHE_DIR", str(root / "cache"))
        mp.delenv("PID_WEIGHTS_DIR", raising=False)
        engine = Engine(preset_options(assets))
        engine.prepare()
        with running_app(engine) as (_, url):
            yield url, root, engine
        engine.close()


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (install it with scripts/install-browser.sh, or set PID_CHROMIUM)")
    with playwright.sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        except Exception as err:  # a browser that cannot start here (missing libraries, ...)
            pytest.skip(f"Chromium at {executable} does not start: {str(err).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    url = server[0]
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#upscale-run")
    yield page
    context.close()


def slider_sizes(page, tab: str) -> list[tuple[int, int]]:
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#{tab}-slider img')].filter(i => i.complete && i.naturalWidth).length"
        " == 2")
    return [tuple(s) for s in page.eval_on_selector_all(
        f"#{tab}-slider img", "els => els.map(e => [e.naturalWidth, e.naturalHeight])")]


def download(page, tab: str, target: Path) -> Image.Image:
    with page.expect_download() as info:
        page.locator(f"#{tab}-file a[download]").first.click()
    info.value.save_as(target)
    return Image.open(target)


def test_upscale_in_the_browser(page, server):
    root = server[1]
    source = root / "landscape.png"
    scene(96, 64).save(source)
    assert page.locator("#pid-model input").input_value().startswith(TINY_ALIAS)
    page.locator("#upscale-image input[type=file]").set_input_files(str(source))
    page.wait_for_selector("#upscale-image img")
    page.click("#upscale-run")
    page.wait_for_selector("#upscale-settings li")
    assert slider_sizes(page, "upscale") == [(384, 256), (384, 256)]  # before (input resized) | PiD, 4x
    result = download(page, "upscale", root / "download.png")
    assert result.size == (384, 256) and result.format == "PNG"
    assert "384x256" in page.inner_text("#upscale-settings")
    shot = root / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).width == VIEWPORT["width"]
    target = os.environ.get("PID_UI_SCREENSHOT")
    if target:  # the docs' copy, in 256 colours to keep the repository small
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Image.open(shot).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(target, optimize=True)


def test_bad_file_shows_one_sentence(page, server):
    root = server[1]
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    page.locator("#upscale-image input[type=file]").set_input_files(str(broken))
    page.click("#upscale-run")
    message = page.get_by_text("broken.png is not an image this page can read").first
    message.wait_for()
    assert "upload a PNG, JPEG" in message.inner_text()
    assert "Traceback" not in page.inner_text("body")


def test_decode_in_the_browser(page, server):
    root = server[1]
    latent = root / "latent.npy"
    np.save(latent, np.random.default_rng(0).standard_normal((1, 16, 3, 5)).astype(np.float32))
    page.get_by_role("tab", name="Decode").click()
    page.locator("#decode-latent input[type=file]").set_input_files(str(latent))
    page.click("#decode-run")
    page.wait_for_selector("#decode-settings li")
    assert slider_sizes(page, "decode") == [(160, 96), (160, 96)]  # VAE decode resized | PiD, 32x the latent
    assert download(page, "decode", root / "decoded.png").size == (160, 96)


def test_cancel_in_the_browser(page, server):
    """Cancel while the job waits for a busy device: it stops before its first step; the next run works."""
    root, engine = server[1], server[2]
    source = root / "cancel.png"
    scene(32, 32).save(source)
    pipe = engine._pipe[1]
    sampled = []
    plain = pipe._sample
    pipe._sample = lambda *a, **k: sampled.append(1) or plain(*a, **k)
    try:
        page.locator("#upscale-image input[type=file]").set_input_files(str(source))
        page.wait_for_selector("#upscale-image img")  # the upload has finished before the job is queued
        with engine._device_lock:  # another job holds the device
            page.click("#upscale-run")
            page.wait_for_timeout(1000)
            page.click("#upscale-cancel")
            page.wait_for_timeout(1000)
        page.wait_for_timeout(1500)
        # No step ran and no result is shown (the panel is empty, or carries gradio's "Error" badge when our
        # "Cancelled" notice reaches the page before gradio's own cancellation does; both are fine).
        assert sampled == [] and page.locator("#upscale-settings li").count() == 0
        page.click("#upscale-run")
        page.wait_for_selector("#upscale-settings li")
        assert sampled == [1] and slider_sizes(page, "upscale") == [(128, 128), (128, 128)]
    finally:
        pipe._sample = plain
