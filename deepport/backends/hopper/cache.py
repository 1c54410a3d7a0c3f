"""The on-disk cache of compiled kernels: private, verified, atomically written, safe across processes.

Layout: one file per kernel, ``<key>.cubin`` in :func:`cache_dir`, holding
``MAGIC + sha256(cubin) + cubin``. Rules (a JIT cache that another user can write is code execution):

- The directory (``$DEEPPORT_CACHE_DIR``, default ``~/.cache/deepport/hopper``) is created with mode
  0700; an existing one must be owned by this user and not writable by group or others, else
  :class:`CacheSecurityError` is raised (nothing is loaded from it).
- An entry is loaded only if its embedded sha256 matches its payload; a truncated or corrupted entry
  reads as missing (the caller recompiles and replaces it).
- Entries are written to a private temporary file in the same directory, flushed, then renamed over
  the final name (``os.replace``), so a reader sees the old entry or the whole new one, never a part.
- Concurrent processes compiling the same key serialise on an ``flock`` of ``<key>.lock`` (the
  second finds the first's entry); without ``fcntl`` they compile twice and the last rename wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

MAGIC = b"DEEPPORT-CUBIN-1\n"
_DIGEST = 32


class CacheSecurityError(RuntimeError):
    """The cache directory is not private to this user, so nothing is loaded from it."""


def cache_dir() -> Path:
    """The cache directory, created (mode 0700) if needed and checked to be private to this user."""
    configured = os.environ.get("DEEPPORT_CACHE_DIR", "").strip()
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "deepport" / "hopper"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise CacheSecurityError(f"kernel cache {path} is owned by uid {info.st_uid}, not by this user "
                                 f"(uid {os.getuid()}); set DEEPPORT_CACHE_DIR to a private directory")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = f"{stat.S_IMODE(info.st_mode):o}"
        raise CacheSecurityError(f"kernel cache {path} is writable by group or others (mode {mode}); expected 0700: "
                                 "chmod 700 it or set DEEPPORT_CACHE_DIR")
    return path


def entry_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.cubin"


def encode(cubin: bytes) -> bytes:
    """The entry bytes of ``cubin``: magic, its sha256, the cubin."""
    return MAGIC + hashlib.sha256(cubin).digest() + cubin


def decode(data: bytes) -> bytes | None:
    """The cubin of an entry, or ``None`` if the entry is truncated, corrupted or not ours."""
    head = len(MAGIC) + _DIGEST
    if len(data) <= head or not data.startswith(MAGIC):
        return None
    digest, payload = data[len(MAGIC):head], data[head:]
    return payload if hashlib.sha256(payload).digest() == digest else None


def load(directory: Path, key: str) -> bytes | None:
    """The verified cubin stored under ``key``, or ``None`` (missing, truncated or corrupted)."""
    try:
        data = entry_path(directory, key).read_bytes()
    except FileNotFoundError:
        return None
    return decode(data)


def store(directory: Path, key: str, cubin: bytes) -> Path:
    """Write the entry for ``key`` atomically (temporary file + ``os.replace``); returns its path."""
    final = entry_path(directory, key)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(cubin))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return final


@contextlib.contextmanager
def locked(directory: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``key`` (a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent compiles are still safe, only duplicated
        yield
        return
    fd = os.open(directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
