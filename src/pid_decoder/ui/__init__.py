"""The local web app served by ``pid-decoder serve`` (optional extra: ``pip install "pid-decoder[ui]"``).

    from pid_decoder.ui import Engine, ServeOptions, WebApp

    engine = Engine(ServeOptions(preset="flux-4k"))
    engine.prepare()                         # load the first model before serving
    with WebApp(engine) as app:
        print(app.start(port=7860))          # 127.0.0.1 unless told otherwise
        ...

`engine` holds the models and runs the jobs (no gradio); `app` builds the Gradio page. Importing this package
imports neither gradio nor torch; `WebApp` imports gradio on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Engine": "engine",
    "ServeOptions": "engine",
    "InputError": "engine",
    "Cancelled": "engine",
    "JobResult": "engine",
    "WebApp": "app",
}

__all__ = ["Cancelled", "Engine", "InputError", "JobResult", "ServeOptions", "WebApp"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .app import WebApp
    from .engine import Cancelled, Engine, InputError, JobResult, ServeOptions
