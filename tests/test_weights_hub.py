"""``hf://<org>/<name>/<path-in-repo>`` weights through huggingface_hub's cache, offline, no network."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from pae_fast.weights import WeightsError, read_state_dict, resolve_weights_file

pytest.importorskip("huggingface_hub")

REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo: str, files: dict[str, dict[str, torch.Tensor]], rev: str = REV):
    """A cache in huggingface_hub's layout: models--org--name/{refs/main, snapshots/<rev>/<path>}."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(rev)
    for path, tensors in files.items():
        f = base / "snapshots" / rev / path
        f.parent.mkdir(parents=True, exist_ok=True)
        if path.endswith(".safetensors"):
            save_file(tensors, str(f))
        else:
            torch.save(tensors, f)
    return root


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_file_resolves_from_the_cache_offline(offline):
    a, b = torch.randn(3, 2), torch.randn(4)
    hub_cache(offline, "org/enc", {"model.safetensors": {"w": a}, "sub/dir/dec.pt": {"ema": {"b": b}}})
    file = resolve_weights_file("hf://org/enc/model.safetensors")
    assert file == offline / "models--org--enc" / "snapshots" / REV / "model.safetensors"
    state, _ = read_state_dict("hf://org/enc/model.safetensors")
    assert torch.equal(state["w"], a)
    state, _ = read_state_dict("hf://org/enc/sub/dir/dec.pt")  # a path inside the repository; {"ema": ...}
    assert torch.equal(state["b"], b)
    state, _ = read_state_dict(f"hf://org/enc@{REV}/model.safetensors")  # an explicit revision
    assert torch.equal(state["w"], a)


def test_missing_file_offline_is_one_clear_line(offline):
    hub_cache(offline, "org/enc", {"model.safetensors": {"w": torch.zeros(1)}})
    for addr in ("hf://org/enc/other.safetensors", "hf://org/absent/model.safetensors"):
        with pytest.raises(WeightsError) as e:
            read_state_dict(addr, key="tokenizer.vfm_weights")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"tokenizer.vfm_weights={addr!r}")
        assert "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" in msg and str(offline) in msg


def test_malformed_address_and_missing_extra(offline, monkeypatch):
    with pytest.raises(WeightsError, match=r"expected hf://<org>/<name>/<path-in-repo>"):
        resolve_weights_file("hf://org/only-a-repo")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if the extra were not installed
    with pytest.raises(WeightsError, match=r"need huggingface_hub; install the extra: pip install 'pae_fast\[hub\]'"):
        resolve_weights_file("hf://org/enc/model.safetensors")


def test_create_tokenizer_takes_hub_weights(offline):
    from pae_fast.registry import create_tokenizer

    torch.manual_seed(0)
    src = create_tokenizer("RAE-tiny")
    enc = {k: v.contiguous() for k, v in src.vfm.model.state_dict().items()}
    full = {k: v.contiguous() for k, v in src.state_dict().items()}
    hub_cache(offline, "me/rae-tiny", {"encoder.safetensors": enc, "tok/ema.safetensors": full})
    tok = create_tokenizer("RAE-tiny", weights="hf://me/rae-tiny/tok/ema.safetensors",
                           vfm_weights="hf://me/rae-tiny/encoder.safetensors")
    for k, v in tok.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_frozen_tokenizer_hashes_hub_files(offline):
    """cache-latents' tokenizer loader: hub weights and a hub encoder, hashed by their cached files."""
    import hashlib

    from pae_fast.registry import create_tokenizer
    from pae_fast.stages.frozen_tokenizer import load_frozen_tokenizer

    torch.manual_seed(0)
    src = create_tokenizer("RAE-tiny")
    enc = {k: v.contiguous() for k, v in src.vfm.model.state_dict().items()}
    dec = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("vfm.")}
    hub_cache(offline, "me/rae-tiny", {"encoder.safetensors": enc, "decoder.safetensors": dec})
    tok, digest = load_frozen_tokenizer("RAE-tiny", "hf://me/rae-tiny/decoder.safetensors",
                                        vfm_weights="hf://me/rae-tiny/encoder.safetensors")
    snap = offline / "models--me--rae-tiny" / "snapshots" / REV
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest == hashlib.sha256(f"{sha(snap / 'decoder.safetensors')}+{sha(snap / 'encoder.safetensors')}"
                                    .encode()).hexdigest()
