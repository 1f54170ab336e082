"""Atomic file writes (temp file in the same folder, fsync, rename) so nothing already written is ever lost."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "save_safetensors", "load_safetensors",
           "check_output_file", "check_output_dir"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success fsync it and rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 and writers such as safetensors' save_file recreate the file: set the mode a plain
        # open() would give (0666 less the umask) after the writer, on whatever file is there now
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_file(path: str | os.PathLike, overwrite: bool = False, key: str = "--out") -> Path:
    """Before any work: ``path`` can be written as a new file (docs/method.md § Reliability).

    Raises:
        OutputError: ``path`` is a folder; it exists and ``overwrite`` is False; its folder (or the nearest existing
            ancestor) is a file or cannot be written. The message names ``key`` and the path.
    """
    from pae_fast.errors import OutputError

    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{key}={str(p)!r} is a folder; expected the path of a file to write")
    if p.exists() and not overwrite:
        raise OutputError(f"{key}={str(p)!r} exists; pass --overwrite to replace it, or choose another path")
    _check_writable(p.parent, key)
    return p


def check_output_dir(path: str | os.PathLike, key: str = "--out") -> Path:
    """Before any work: ``path`` is (or can be created as) a writable folder.

    Raises:
        OutputError: ``path`` (or an ancestor) is a file, or the folder cannot be written; names ``key``.
    """
    p = Path(path)
    _check_writable(p, key)
    return p


def _check_writable(folder: Path, key: str) -> None:
    """The nearest existing ancestor of ``folder`` (itself included) is a folder where a file can be created."""
    from pae_fast.errors import OutputError

    d = folder
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise OutputError(f"{key}: {str(d)!r} is a file, so the folder {str(folder)!r} cannot be created")
    try:  # the only reliable test (read-only mounts, ACLs, root): create a file
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{key}: cannot write in {str(d)!r} ({e.strerror or e})") from e


def _umask() -> int:
    """The process umask; read from /proc where possible (setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically save a dict of tensors as safetensors (contiguous CPU copies), with string metadata."""
    from safetensors.torch import save_file

    clean, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        clean[k] = t
    def write(tmp: Path) -> None:
        save_file(clean, str(tmp), metadata=metadata)
        _sort_safetensors_header(tmp)

    atomic_write_with(path, write)


def _sort_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, so that the same tensors and metadata always give
    the same bytes (the writer emits ``__metadata__`` in hash-map order, which changes from call to call).

    The header is 8 bytes of little-endian length, then JSON padded with spaces; the data offsets are relative to
    its end, so a header of the same length is rewritten in place, else the file is rewritten."""
    import json
    import shutil
    import struct

    with open(path, "rb+") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        header += b" " * (-(8 + len(header)) % 8)
        if header == raw:
            return
        if len(header) == n:
            f.seek(8)
            f.write(header)
            return
        tmp = path.with_name(path.name + ".sorted")
        with open(tmp, "wb") as g:
            g.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(f, g, 1 << 24)
    os.replace(tmp, path)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """Load tensors and metadata from a safetensors file; a clear error names a missing or damaged file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"weights file {path} is damaged or not a safetensors file: {e}") from e
    return tensors, meta
