#!/usr/bin/env bash
# Installs the headless browser that tests/test_ui_browser.py drives: Debian's Chromium (apt package
# `chromium`), plus a font so that screenshots have text. Idempotent: does nothing when a Chromium is
# already there. Never fails: where it cannot install (not root, no apt-get, no network) it says why and
# exits 0, and the browser tests are skipped with that reason.
#
# The Python side comes from pip: pip install -e ".[dev,ui]"   (gradio, and playwright to drive the browser;
# Playwright's own browser download is not needed: the tests launch /usr/bin/chromium via executable_path).
set -u

found=""
for candidate in "${PID_CHROMIUM:-}" "$(command -v chromium 2>/dev/null)" "$(command -v chromium-browser 2>/dev/null)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
        found="$candidate"
        break
    fi
done
if [ -n "$found" ]; then
    echo "install-browser: Chromium present: $found"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get on this machine; install Chromium yourself (or set PID_CHROMIUM); the browser tests will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    run=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run=(sudo -n)
else
    echo "install-browser: not root and no password-less sudo, so cannot apt-get install chromium; the browser tests will be skipped" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if "${run[@]}" apt-get update -qq && \
   "${run[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
    echo "install-browser: installed $(command -v chromium)"
else
    echo "install-browser: apt-get install chromium failed; the browser tests will be skipped" >&2
fi
exit 0
