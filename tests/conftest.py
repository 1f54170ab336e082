"""Test setup: the Triton interpreter on machines without a CUDA device (must precede the first triton import)."""

import os
from pathlib import Path

if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # pytest-xdist runs one worker per core

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def run_until_sigterm():
    """``run(args, at_step=2, marker=None, stream="stdout") -> (returncode, stdout, stderr)``: runs ``python -m
    pae_fast *args`` from the repository root (one thread) and sends it SIGTERM as soon as ``stream`` shows ``marker``
    (default: the training log's ``step <at_step>/``, a preemption mid-run); the returned streams are complete."""
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def run(args: list[str], at_step: int = 2, timeout: float = 180, marker: str | None = None,
            stream: str = "stdout") -> tuple[int, str, str]:
        marker = marker if marker is not None else f"step {at_step}/"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "pae_fast", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        seen = []
        try:
            for line in proc.stdout if stream == "stdout" else proc.stderr:
                seen.append(line)
                if marker in line:
                    proc.send_signal(signal.SIGTERM)
                    break
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        if stream == "stdout":
            return proc.returncode, "".join(seen) + stdout, stderr
        return proc.returncode, stdout, "".join(seen) + stderr

    return run


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Three classes of two small JPEGs (crops of scikit-image photographs), ``<root>/c<k>/<i>.jpg``."""
    import numpy as np
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):
        img = getattr(skimage.data, name)()[..., :3]
        (root / f"c{k}").mkdir()
        for i in range(2):
            Image.fromarray(np.ascontiguousarray(img[40 * i : 40 * i + 80, 30:110])).save(root / f"c{k}" / f"{i}.jpg")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def snapshot():
    """``snapshot(folder) -> {relative path: bytes}`` of every file below ``folder`` (to assert nothing changed)."""
    return _snapshot


def _one_error_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("internal error" in e for e in err), err
    for w in words:
        assert w in err[-1], (w, err[-1])
    return err[-1]


@pytest.fixture
def one_error_line():
    """``one_error_line(capsys, *words) -> line``: the command's stderr ended in one ``error:`` line (no internal
    error) naming every one of ``words``."""
    return _one_error_line



_FRESH = "PAE_FAST_TEST_FRESH_PROCESS"


@pytest.fixture
def fresh_process(request) -> bool:
    """Runs the requesting test again in a fresh interpreter (``python -m pytest <its node id>``) and fails if that
    run fails; returns False here, where the test then returns, and True inside that run, where its body executes.

    For the tokenizer roofline counts: they dispatch our mutating custom ops on fake tensors, and in a pytest worker
    that had run some 50 other test files first that dispatch crashed inside torch's C++ dispatcher (a segfault, or
    ``std::bad_alloc``), while the same tests pass in any fresh process (the benchmark scripts always run in one).
    A crashed xdist worker also hung the whole run; a child process turns that into one failing test."""
    import subprocess
    import sys

    node = request.node.nodeid
    if os.environ.get(_FRESH) == node:
        return True
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=root,
                          env={**os.environ, _FRESH: node}, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"{node} in a fresh process:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return False
