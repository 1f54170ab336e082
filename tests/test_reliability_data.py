"""Issue 25, the data side: 16-bit images scaled by the PIL readers as DALI scales them (or refused by name),
``data.on_bad_file: skip`` honoured by the tokenizer stages, no NaN shard ever written, OS errors mapped to one
line with exit code 3, and identical contents written as identical bytes."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pae_fast.cli import main
from pae_fast.errors import EXIT_DATA
from pae_fast.io import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--train.progress", "false", "--train.log_every", "2", "--train.ckpt_every", "2"]




def write_png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4)) written byte by byte (PNG spec: IHDR bit depth
    16, big-endian samples, filter 0 per row), independent of PIL's writer."""
    arr = np.asarray(arr, dtype=np.uint16)
    h, w = arr.shape[:2]
    color = 0 if arr.ndim == 2 else {3: 2, 4: 6}[arr.shape[2]]
    rows = arr.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\x00" + r.tobytes() for r in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
    path.write_bytes(png + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------------ 2: 16-bit PNGs
def _pixels(path: Path) -> np.ndarray:
    from pae_fast.data.images import load_image

    return np.asarray(load_image(path), dtype=np.int64)


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    g = np.random.default_rng(0).integers(0, 65536, (24, 32)).astype(np.uint16)
    x = _pixels(write_png16(tmp_path / "g.png", g))
    want = np.floor(g.astype(np.float64) / 257 + 0.5).astype(np.int64)  # v/257 rounded, 65535 -> 255
    assert x.shape == (24, 32, 3) and (x == want[..., None]).all()
    assert x.min() < 20 and 20 < x.mean() < 235  # not all white


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_rgb_png_keeps_its_values(tmp_path, channels):
    rgb = np.random.default_rng(1).integers(0, 65536, (20, 28, channels)).astype(np.uint16)
    x = _pixels(write_png16(tmp_path / "c.png", rgb))
    assert np.abs(x - rgb[..., :3].astype(np.float64) / 257).max() <= 1.0  # within one level of v/257


def test_16bit_png_in_reconstruct_and_evaluate_loaders(tmp_path):
    from pae_fast.eval.images import load_image_folder
    from pae_fast.eval.reconstruct import load_square_image

    g = np.full((16, 16), 257 * 100, dtype=np.uint16)
    f = write_png16(tmp_path / "g.png", g)
    assert torch.allclose(load_square_image(f, 16), torch.full((3, 16, 16), 100 / 255))
    assert (load_image_folder(tmp_path) == 100).all()


def test_float_tiff_is_refused_by_name(tmp_path):
    from PIL import Image

    from pae_fast.data.images import BadImageError, load_image

    f = tmp_path / "f.tiff"
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32), mode="F").save(f)
    with pytest.raises(BadImageError, match="f.tiff.*floating-point"):
        load_image(f)


def test_16bit_png_pil_matches_dali(tmp_path):
    dali = pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(2)
    files = {"grey": write_png16(tmp_path / "g.png", rng.integers(0, 65536, (24, 32)).astype(np.uint16)),
             "rgb": write_png16(tmp_path / "c.png", rng.integers(0, 65536, (24, 32, 3)).astype(np.uint16))}

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode(path):
        raw, _ = fn.readers.file(files=[path])
        return fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    for kind, f in files.items():
        try:
            pipe = decode(str(f))
            pipe.build()
            ref = np.array(pipe.run()[0].as_tensor())[0].astype(np.int64)
        except RuntimeError as e:  # a DALI build without a CPU decoder
            pytest.skip(f"DALI {dali.__version__} cannot decode on the CPU here: {e}")
        diff = np.abs(_pixels(f) - ref).max()
        assert diff == 0 if kind == "grey" else diff <= 1, (kind, diff)


# ------------------------------------------------------------------------------------------------ 3: on_bad_file
def test_tokenizer_data_honours_on_bad_file_skip(tmp_path, image_folder):
    import shutil

    from pae_fast.config import load_config
    from pae_fast.stages.image_data import open_image_data

    root = tmp_path / "imgs"
    shutil.copytree(image_folder, root)
    (root / "c1" / "9.jpg").write_bytes(b"not a jpeg")
    over = {"data.source": "folder", "data.root": str(root), "data.image_size": 32, "data.on_bad_file": "skip"}
    train, _ = open_image_data(load_config(None, over), 0)
    batch = train.collate_fn([train[i] for i in range(len(train))])
    assert batch[0].shape == (6, 3, 32, 32) and train.collate_fn.bad_files.count == 1
    strict, _ = open_image_data(load_config(None, {**over, "data.on_bad_file": "error"}), 0)
    with pytest.raises(Exception, match="9.jpg"):  # the default still stops on it, naming the file
        [strict[i] for i in range(len(strict))]
    # a batch with no good item is refused with one line naming a file (never an empty training step)
    from pae_fast.errors import DataError

    bad = [it for it in (train[i] for i in range(len(train))) if it[0] is None]
    with pytest.raises(DataError, match=r"every item of a batch of 2 failed to decode .*9\.jpg"):
        train.collate_fn(bad * 2)


@pytest.mark.parametrize("policy,code", [("skip", 0), ("error", EXIT_DATA)])
def test_train_tokenizer_on_a_folder_with_a_bad_jpeg(tmp_path, image_folder, capsys, policy, code, one_error_line):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(image_folder, root)
    (root / "c2" / "5.jpg").write_bytes(b"\xff\xd8 truncated")
    argv = ["train-tokenizer", "--config", str(ROOT / "configs" / "tokenizer_tiny_cpu.yaml"), "--data.source",
            "folder", "--data.root", str(root), "--data.num_classes", "3", "--data.on_bad_file", policy,
            "--tokenizer.heldout_items", "1", "--train.steps", "2", "--train.global_batch_size", "4",
            "--data.num_workers", "0", "--out_dir", str(tmp_path / "run"), *FAST]
    capsys.readouterr()
    assert main(argv) == code
    if code:
        one_error_line(capsys, "5.jpg", "data.on_bad_file=skip")


def test_os_errors_map_to_one_line_exit_3():
    from pae_fast.errors import describe, exit_code_for

    e = PermissionError(13, "Permission denied", "/out/x.png")
    assert exit_code_for(e) == EXIT_DATA and describe(e) == "'/out/x.png': Permission denied"
    e = OSError(30, "Read-only file system", "/ro/a", None, "/ro/b")  # (errno, strerror, filename, winerror, filename2)
    assert exit_code_for(e) == EXIT_DATA and describe(e) == "'/ro/a' -> '/ro/b': Read-only file system"
    assert exit_code_for(FileExistsError(17, "File exists", "/f")) == EXIT_DATA


def test_nan_latents_leave_no_shard(tmp_path, image_folder):
    from pae_fast.config import load_config
    from pae_fast.errors import DataError
    from pae_fast.stages.cache_latents import write_shards

    class NaNEncoder(torch.nn.Module):  # finite weights whose encoding overflows: item 1 of each batch
        image_size, latent_shape, stats_mode = 32, (2, 4, 4), "channel"

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.zeros(x.shape[0], 2, 4, 4)
            z[1:2] = float("inf")
            return z

    data = load_config(None, {"data.root": str(image_folder), "data.num_classes": 3, "data.image_size": 32,
                              "data.loader": "pil", "data.num_workers": 0, "data.batch_size": 2}).data
    with pytest.raises(DataError, match="latents of item 1 hold NaN/Inf"):
        write_shards(NaNEncoder(), data, tmp_path / "c", tokenizer_name="x", weights_hash="h", shard_size=2)
    assert not list((tmp_path / "c").glob("shard-*"))



def test_same_contents_same_bytes(tmp_path, snapshot):
    from pae_fast.data.latent_cache import write_latent_cache
    from pae_fast.engine.checkpoint import save_weights, write_checkpoint

    meta = {f"key{i}": str(i) for i in range(12)}
    digests = set()
    for i in range(4):
        save_safetensors({"b": torch.ones(3), "a": torch.zeros(2)}, tmp_path / f"w{i}.safetensors", metadata=meta)
        digests.add(hashlib.sha256((tmp_path / f"w{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    z, y = torch.randn(6, 4, 4, 4), torch.arange(6) % 2
    caches = [write_latent_cache(tmp_path / f"c{i}", z, y, num_classes=2) for i in range(3)]
    assert snapshot(caches[0]) == snapshot(caches[1]) == snapshot(caches[2])
    state = {"w": torch.randn(3, 3)}
    ckpts = []
    for i, info in enumerate(({"b": 1, "a": 2}, {"a": 2, "b": 1})):  # the same contents in another order
        files = {"model.safetensors": save_weights(state, dict(reversed(meta.items())) if i else meta)}
        ckpts.append(write_checkpoint(tmp_path / f"run{i}" / "checkpoints", 7, files, info=info))
    assert snapshot(ckpts[0]) == snapshot(ckpts[1])
