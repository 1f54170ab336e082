"""LightningDiT and DiT^DH: backends, meta device, compile, init, label dropout, checkpointing, loading, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pae_fast.kernels import use_backend
from pae_fast.models.generator import generator_from_config, load_generator_weights
from pae_fast.registry import create_generator, list_generators

NAMES = ["LightningDiT-B/2", "DiTDH-S"]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fwd_bwd(model, x, t, y, seed: int = 3):
    torch.manual_seed(seed)  # same label-dropout draws in every run
    model.zero_grad(set_to_none=True)
    v = model(x, t, y)
    (v.square().mean() + v.mean()).backward()
    return v.detach(), _grads(model)


def test_registry_lists_every_variant():
    names = list_generators()
    for size in ("B", "L", "XL", "1p0B", "1p6B"):
        for p in (1, 2):
            assert f"LightningDiT-{size}/{p}" in names
    for size in ("S", "B", "L", "XL"):
        assert f"DiTDH-{size}" in names


@pytest.mark.parametrize("name", NAMES)
def test_tiny_forward_backward_cpu(tiny, inputs, name):
    m = tiny(name, use_qknorm=True).train()
    x, t, y = inputs(m)
    v, grads = _fwd_bwd(m, x, t, y)
    assert v.shape == x.shape and torch.isfinite(v).all()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert set(grads) == trainable  # every trainable weight gets a gradient
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert not m.pos_embed.requires_grad and m.pos_embed.grad is None  # fixed APE


@pytest.mark.parametrize("name,kw", [("LightningDiT-B/2", {"use_qknorm": True}), ("DiTDH-S", {"wo_shift": True})])
def test_triton_backend_matches_torch(tiny, inputs, name, kw):
    """Fused Triton kernels (interpreter on CPU) vs the PyTorch references: output and every gradient."""
    m = tiny(name, **kw).train()
    x, t, y = inputs(m)
    with use_backend("torch"):
        v_ref, g_ref = _fwd_bwd(m, x, t, y)
    with use_backend("triton"):
        v_tri, g_tri = _fwd_bwd(m, x, t, y)
    torch.testing.assert_close(v_tri, v_ref, atol=1e-5, rtol=1e-4)
    assert g_tri.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_tri[n], g_ref[n], atol=1e-4, rtol=1e-3, msg=lambda s, n=n: f"grad of {n}: {s}")


def test_triton_backend_under_autocast(tiny, inputs):
    """Mixed precision as in training (fp16 here: the interpreter has no bf16): a fp32 residual stream (the fp32 APE
    promotes it) meets half-precision linear outputs and modulation inside the fused ops."""
    m = tiny("DiTDH-S").eval()
    x, t, y = inputs(m)
    out = {}
    for backend in ("torch", "triton"):
        with use_backend(backend), torch.autocast("cpu", dtype=torch.float16):
            out[backend] = m(x, t, y).float()
    assert torch.isfinite(out["triton"]).all()
    torch.testing.assert_close(out["triton"], out["torch"], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("name", ["LightningDiT-XL/1", "DiTDH-XL"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_full_size_forward_backward_on_meta(name, backend):
    """Full-size models on the meta device: the custom ops' fake implementations (triton) and the references."""
    with torch.device("meta"):
        m = create_generator(name)
        x = torch.empty(2, m.in_channels, 16, 16)
        t, y = torch.empty(2), torch.zeros(2, dtype=torch.long)
    with use_backend(backend):
        v = m(x, t, y)
        v.sum().backward()
    assert v.shape == x.shape and v.device.type == "meta"
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters() if p.requires_grad)


def test_compile_fullgraph_no_graph_breaks(tiny, inputs):
    """torch.compile(fullgraph=True) of forward + backward through the fused custom ops (no graph breaks)."""
    torch._dynamo.reset()
    m = tiny("LightningDiT-B/2", use_qknorm=True).eval()
    x, t, y = inputs(m)
    with use_backend("triton"):
        v_eager, g_eager = _fwd_bwd(m, x, t, y)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        v_comp, g_comp = _fwd_bwd(compiled, x, t, y)
    torch.testing.assert_close(v_comp, v_eager, atol=1e-5, rtol=1e-4)
    for n in g_eager:
        torch.testing.assert_close(g_comp[n], g_eager[n], atol=1e-4, rtol=1e-3)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_fullgraph_ditdh(tiny, inputs):
    torch._dynamo.reset()
    m = tiny("DiTDH-S").eval()
    x, t, y = inputs(m)
    with use_backend("triton"):
        v_eager, _ = _fwd_bwd(m, x, t, y)
        v_comp, _ = _fwd_bwd(torch.compile(m, fullgraph=True, backend="aot_eager"), x, t, y)
    torch.testing.assert_close(v_comp, v_eager, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_gives_zero_output(tiny, inputs, name):
    """adaLN-Zero: zero adaLN and zero final layer -> v == 0 exactly at init, in train and eval mode."""
    m = tiny(name, perturb=False)
    x, t, y = inputs(m)
    with torch.no_grad():
        assert torch.count_nonzero(m.train()(x, t, y)) == 0
        assert torch.count_nonzero(m.eval()(x, t, y)) == 0
    v, grads = _fwd_bwd(m, x, t, y)
    assert grads["final_layer.linear.bias"].abs().sum() > 0  # ... yet it learns from step one


@pytest.mark.parametrize("name", NAMES)
def test_label_dropout_and_null_class(tiny, inputs, name):
    m = tiny(name, class_dropout=1.0)
    assert m.null_class == m.num_classes == 3
    assert m.y_embedder.embedding_table.num_embeddings == 4  # classes + the null row
    x, t, y = inputs(m)
    null = torch.full_like(y, m.null_class)
    with torch.no_grad():
        dropped = m.train()(x, t, y)  # every label dropped in training
        uncond = m.eval()(x, t, null)  # the explicit unconditional branch (guidance)
        cond = m.eval()(x, t, y)  # eval never drops
    torch.testing.assert_close(dropped, uncond)
    assert (cond - uncond).abs().max() > 1e-4
    m.y_embedder.dropout_prob = 0.1
    torch.manual_seed(0)
    with torch.no_grad():
        labels = torch.zeros(4000, dtype=torch.long)
        drop_rate = (m.y_embedder(labels, train=True) == m.y_embedder.embedding_table.weight[3]).all(-1).float().mean()
    assert abs(drop_rate.item() - 0.1) < 0.02


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_same_gradients(tiny, inputs, name):
    m = tiny(name).train()
    x, t, y = inputs(m)
    v0, g0 = _fwd_bwd(m, x, t, y)
    m.set_grad_checkpointing(True)
    v1, g1 = _fwd_bwd(m, x, t, y)
    torch.testing.assert_close(v1, v0, atol=0, rtol=0)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)


def test_meta_build_to_empty_initialize_and_load(tmp_path, tiny, inputs):
    """Build on meta, materialise with to_empty + initialize_weights, then load a saved state dict (strict)."""
    from pae_fast.io import save_safetensors

    src = tiny("LightningDiT-B/2")
    with torch.device("meta"):
        m = create_generator("LightningDiT-B/2", **src.arch)
    m = m.to_empty(device="cpu")
    m.initialize_weights()
    x, t, y = inputs(m)
    with torch.no_grad():
        assert torch.count_nonzero(m.eval()(x, t, y)) == 0  # a valid zero-init model, RoPE tables rebuilt
    path = tmp_path / "gen.safetensors"
    upstream = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP-style prefix
    upstream["feat_rope.freqs_cos"] = torch.zeros(16, 16)  # LightningDiT saves its RoPE tables
    save_safetensors(upstream, path)
    m.feat_rope.cos.fill_(float("nan"))  # load_state_dict rebuilds the non-persistent RoPE tables
    load_generator_weights(m, str(path))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x, t, y), src.eval()(x, t, y))
    torch.save({"ema": src.state_dict(), "opt": {"step": 1}}, tmp_path / "ckpt.pt")
    load_generator_weights(m, str(tmp_path / "ckpt.pt"))
    bad = tmp_path / "bad.safetensors"
    save_safetensors({"nope": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="missing .*unexpected .*nope"):
        load_generator_weights(m, str(bad))


def test_generator_from_config_tiny_preset():
    from pae_fast.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")
    m = generator_from_config(cfg.model)
    assert m.variant == cfg.model.name and len(m.blocks) == 2 and m.hidden_size == 64 and m.in_channels == 4
    cfg.model.name, cfg.model.head_depth, cfg.model.head_hidden_size, cfg.model.head_num_heads = "DiTDH-S", 1, 32, 2
    d = generator_from_config(cfg.model, device="meta")
    assert len(d.blocks) == 3 and d.head_hidden_size == 32 and d.pos_embed.device.type == "meta"


def test_clear_errors(tiny):
    with pytest.raises(TypeError, match="head_depth.*valid options"):
        create_generator("LightningDiT-XL/1", head_depth=2)
    with pytest.raises(KeyError, match="Valid names"):
        create_generator("LightningDiT-XXL/1")
    with pytest.raises(ValueError, match="head_dim"):
        create_generator("LightningDiT-B/2", hidden_size=60, num_heads=4, depth=1)
    m = tiny("LightningDiT-B/2")
    x, t, y = torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x_t must be \(B, 4, 8, 8\)"):
        m(torch.zeros(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        m(x, t, y.float())
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.zeros(3), y)
    assert m(x, torch.tensor(0.5), y).shape == x.shape  # a scalar t broadcasts over the batch
