"""Helpers shared by the web app tests (no tests here): server options over the tiny models, a free port, a
running app, and a test picture that is not noise."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

from .test_pipeline_support import TINY_ALIAS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_options(assets: dict, **changes):
    """`serve --checkpoint tiny.pth --config tiny.json --backbone flux ...`: works in subprocesses too."""
    from pid_decoder.ui import ServeOptions

    kwargs = dict(
        checkpoint=str(assets["checkpoint"]), config=json.loads(Path(assets["config"]).read_text()), backbone="flux",
        backbone_path=str(assets["vae"]), text_embedding=str(assets["embedding"]), device="cpu",
        weights_dir=str(Path(assets["checkpoint"]).parent / "no-release-here"),
    )
    kwargs.update(changes)
    return ServeOptions(**kwargs)


def preset_options(assets: dict, **changes):
    """`serve --preset tiny-flux --weights-dir ...`: needs `register_presets` (in this process only)."""
    from pid_decoder.ui import ServeOptions

    kwargs = dict(
        preset=TINY_ALIAS, weights_dir=str(assets["weights"]), backbone_path=str(assets["vae"]),
        text_embedding=str(assets["embedding"]), negative_embedding=str(assets["embedding"]), device="cpu",
    )
    kwargs.update(changes)
    return ServeOptions(**kwargs)


@contextlib.contextmanager
def running_app(engine, **start):
    """A started `WebApp` on a free loopback port; always closed."""
    from pid_decoder.ui import WebApp

    app = WebApp(engine)
    try:
        url = app.start("127.0.0.1", free_port(), **start)
        yield app, url
    finally:
        app.close()


def scene(width: int, height: int):
    """A small landscape (sky gradient, sun, hills, a house) so that screenshots show a picture."""
    import numpy as np
    from PIL import Image, ImageDraw

    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 210]) + y * np.array([250, 210, 160])
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = height // 7
    draw.ellipse((width * 0.7 - r, height * 0.3 - r, width * 0.7 + r, height * 0.3 + r), fill=(255, 236, 120))
    draw.polygon([(0, height * 0.75), (width * 0.35, height * 0.5), (width * 0.7, height * 0.78), (0, height)],
                 fill=(60, 120, 60))
    draw.rectangle((0, height * 0.8, width, height), fill=(40, 95, 45))
    x0, y0 = int(width * 0.55), int(height * 0.6)
    draw.rectangle((x0, y0, x0 + width // 7, y0 + height // 6), fill=(200, 60, 50))
    draw.polygon([(x0 - 2, y0), (x0 + width // 14, y0 - height // 9), (x0 + width // 7 + 2, y0)], fill=(90, 40, 30))
    return image
