"""The public API: every exported name resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import pid_decoder


def test_every_exported_name_resolves():
    for name in pid_decoder.__all__:
        assert getattr(pid_decoder, name) is not None, name


def test_import_does_not_pull_in_diffusers_or_transformers():
    code = "import sys, pid_decoder; pid_decoder.load_network; print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
