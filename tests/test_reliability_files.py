"""write_h5ad: unique temporary names, nothing left behind, a full disk as one clear error."""

from __future__ import annotations

import shutil
import threading
from collections import namedtuple

import anndata as ad
import pytest

from statecore.cli._common import write_h5ad
from statecore.errors import StatecoreError


def test_two_writers_of_one_target_both_succeed(tmp_path, prepared_synthetic):
    target, errors = tmp_path / "p.h5ad", []

    def write():
        try:
            write_h5ad(prepared_synthetic, target)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and ad.read_h5ad(target).shape == prepared_synthetic.shape
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5ad"]  # no temporary file left
    (tmp_path / "plain").write_text("")  # the unique temp name must not make the file private
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, prepared_synthetic, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(StatecoreError, match="not enough disk space"):
        write_h5ad(prepared_synthetic, tmp_path / "p.h5ad")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_removes_its_temp_file(tmp_path, prepared_synthetic, monkeypatch):
    def boom(self, path, **kw):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", boom)
    with pytest.raises(StatecoreError, match="No space left on device"):
        write_h5ad(prepared_synthetic, tmp_path / "p.h5ad")
    assert list(tmp_path.iterdir()) == []
