"""loratune.fileio: atomic writes leave the old file or the new one, never a partial one or a stray temp file."""
from __future__ import annotations

import errno
import os

import pytest

from loratune import fileio
from loratune.fileio import write_atomic, write_figure


def test_write_atomic_replaces_with_bytes_or_utf8_text_and_open_permissions(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    assert write_atomic(path, b"\x00new") == path and path.read_bytes() == b"\x00new"
    write_atomic(path, "σ = 1\n")
    assert path.read_bytes() == "σ = 1\n".encode("utf-8")
    ref = tmp_path / "ref"
    ref.write_text("x")  # what open() gives a new file under this umask
    assert os.stat(path).st_mode & 0o777 == os.stat(ref).st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "summary.json"]


def test_error_mid_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "sweep.md"
    path.write_text("old table")
    real_fdopen = os.fdopen

    class DiskFull:
        """Writes half of the data, then fails as a full disk would."""

        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: DiskFull(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new table, longer than the old one")
    assert path.read_text() == "old table"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.md"]


def test_failed_figure_render_writes_nothing(tmp_path):
    class BrokenFigure:
        def savefig(self, fh, **kwargs):
            fh.write(b"\x89PNG partial")
            raise RuntimeError("render failed")

    path = tmp_path / "loss.png"
    path.write_bytes(b"old plot")
    with pytest.raises(RuntimeError, match="render failed"):
        write_figure(BrokenFigure(), path)
    assert path.read_bytes() == b"old plot" and [p.name for p in tmp_path.iterdir()] == ["loss.png"]
