"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a half-written one.

One implementation for every file loratune writes in place (run summaries, sweep tables and JSON, loss / spectrum /
sweep plots); directories are swapped by :func:`loratune.adapters.replace_dir`.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` through a temporary file in the same directory (so the rename
    cannot cross file systems) and ``os.replace``. On any error the temporary file is removed and ``path`` keeps
    its old content. The new file gets the permissions ``open()`` would give it."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Render a matplotlib figure as PNG in memory, then :func:`write_atomic` it: a failed render leaves no file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    return write_atomic(path, buf.getvalue())


def _umask() -> int:
    """The process umask (read from /proc where possible, so it is never changed even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
