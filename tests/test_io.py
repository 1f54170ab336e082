"""Atomic writes: nothing half-written is ever visible, a failed write leaves the old file, modes are normal."""

import os
import stat

import pytest
import torch

from pae_fast.io import atomic_write_text, load_safetensors, save_safetensors


def test_failed_write_keeps_the_previous_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    class Boom(Exception):
        pass

    from pae_fast.io import atomic_path

    with pytest.raises(Boom), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise Boom
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.txt"]


def test_written_files_get_the_umask_mode(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask


def test_safetensors_round_trip_shared_memory_and_errors(tmp_path):
    a = torch.randn(3, 4)
    save_safetensors({"a": a, "alias": a, "view": a[1]}, tmp_path / "w.safetensors", metadata={"k": "v"})
    t, meta = load_safetensors(tmp_path / "w.safetensors")
    assert torch.equal(t["a"], a) and torch.equal(t["alias"], a) and torch.equal(t["view"], a[1]) and meta == {"k": "v"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.safetensors is damaged"):
        load_safetensors(tmp_path / "bad.safetensors")
