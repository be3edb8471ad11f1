"""Files that are either complete or absent: atomic writes, stale-temp cleanup and per-output claims.

A write goes to a temporary file in the destination's folder, named ``.{name}.{host}-{pid}.{random}.tmp`` so that
a later run recognises it (and whose it was), is flushed to disk, given the permissions a plain ``open()`` would
give (``0o666 & ~umask``; ``mkstemp``'s 0600 would hide outputs from a web server or another user) and renamed
over the destination. Any error removes the temporary file.

A batch that is killed (``kill -9``, power loss) can leave such temporary files behind: ``clean_stale_temps``
removes those whose writer is gone (same host, dead PID) or that are older than a limit.

Two runs over the same outputs split the work through claims: ``claim(path)`` creates ``.{name}.claim`` with
``O_EXCL`` before an output's work starts and removes it afterwards; a claim left by a dead process of this host
(or older than a limit, for other hosts sharing the folder) is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
CLAIM_SUFFIX = ".claim"
STALE_TEMP_SECONDS = 24 * 3600.0  # a temp file of another host is left alone for this long
STALE_CLAIM_SECONDS = 12 * 3600.0  # a claim of another host is honoured for this long

# .{name}.{host}-{pid}.{8 hex}.tmp
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]{1,32})-(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _host() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")[:32]
    return host or "host"


def default_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    try:  # Linux >= 4.7 reports the umask without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it (restored at once)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary-file name next to ``path`` in the recognisable pattern (not created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object], *, mode: int | None = None) -> Path:
    """Run ``write_fn(tmp_path)`` (it creates and fills the file), then fsync and rename it onto ``path``.

    The parent folder is created. The final permissions are ``mode`` or ``0o666 & ~umask``. On any error, the
    temporary file is removed and the error re-raised; ``path`` is untouched (an older version stays as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # reserve the name; writers reopen it
    os.close(fd)
    try:
        write_fn(str(tmp))
        if not tmp.is_file():
            raise OSError(errno.ENOENT, f"the writer of {path} left no file behind", str(tmp))
        os.chmod(tmp, default_mode() if mode is None else mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, mode=mode)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(
    folder: str | os.PathLike, older_than: float = STALE_TEMP_SECONDS, *, recursive: bool = True
) -> list[Path]:
    """Remove temporary files of ``atomic_write`` whose writer is gone; return the removed paths.

    A temp file is stale when its writer ran on this host and that PID no longer exists, or when it is older
    than ``older_than`` seconds (writers on other hosts of a shared folder). Files of live writers stay.
    Stale claims (``.NAME.claim`` of a dead process of this host, or older than ``STALE_CLAIM_SECONDS``) go too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host, now, removed = _host(), time.time(), []
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    for p in candidates:
        if p.name.endswith(TEMP_SUFFIX):
            m = _TEMP_RE.match(p.name)
            if m is None:
                continue
            pid = int(m["pid"])
            try:
                age = now - p.stat().st_mtime
            except FileNotFoundError:
                continue
            if m["host"] == host:
                stale = pid != os.getpid() and (not _pid_alive(pid) or age > older_than)
            else:
                stale = age > older_than
        elif p.name.endswith(CLAIM_SUFFIX):
            stale = _read_claim(p) is not None and _claim_stale(p)  # only files that are claims of ours
        else:
            continue
        if not stale:
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue  # removed by someone else meanwhile
        except OSError as err:
            logger.warning("could not remove stale temporary file %s: %s", p, err)
            continue
        removed.append(p)
    if removed:
        logger.info("removed %d stale temporary file(s) under %s", len(removed), folder)
    return removed


# --------------------------------------------------------------------------- claims
def claim_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{CLAIM_SUFFIX}")


def _read_claim(p: Path) -> tuple[str, int] | None:
    try:
        text = p.read_text(encoding="utf-8").strip()
        host, pid = text.rsplit(" ", 1)
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _claim_stale(p: Path, *, older_than: float = STALE_CLAIM_SECONDS) -> bool:
    owner = _read_claim(p)
    try:
        age = time.time() - p.stat().st_mtime
    except FileNotFoundError:
        return False
    if owner is None:  # unreadable or half-written: stale once it is not brand new
        return age > 5.0
    host, pid = owner
    if host == _host():
        return pid != os.getpid() and not _pid_alive(pid)
    return age > older_than


def try_claim(path: str | os.PathLike) -> Path | None:
    """Create ``path``'s claim file atomically; the claim's path, or None when another live process holds it.

    A stale claim (its process is gone) is taken over.
    """
    cp = claim_path(path)
    cp.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(cp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _claim_stale(cp):
                return None
            # Take the stale claim over by renaming it away first: of two runs racing for it only one rename wins.
            grave = cp.with_name(f"{cp.name}.{os.getpid()}.{secrets.token_hex(4)}.stale")
            try:
                os.rename(cp, grave)
            except FileNotFoundError:
                continue
            if not _claim_stale(grave):  # another run took it over between our check and our rename: give it back
                with contextlib.suppress(OSError):
                    os.link(grave, cp)
                grave.unlink(missing_ok=True)
                return None
            grave.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{_host()} {os.getpid()}\n")
        return cp
    return None


def release_claim(claim: Path | None) -> None:
    if claim is not None:
        with contextlib.suppress(FileNotFoundError):
            claim.unlink()


@contextlib.contextmanager
def claim(path: str | os.PathLike) -> Iterator[bool]:
    """``with claim(out) as mine:`` — ``mine`` is True when this process may produce ``out``; released on exit."""
    cp = try_claim(path)
    try:
        yield cp is not None
    finally:
        release_claim(cp)
