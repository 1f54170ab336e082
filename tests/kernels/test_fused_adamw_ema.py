"""fused_adamw_ema: the op-table cases against the fp64 reference (torch._fused_adamw_ + _foreach_lerp_), several
steps against torch.optim.AdamW(fused=True) + _foreach_lerp_, skipped steps, meta/fake, bad input."""

import pytest
import torch

from pae_fast.kernels import OPS, fused_adamw_ema
from pae_fast.kernels.tools.testing import assert_cases_match

SPEC = OPS["fused_adamw_ema"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cases_match_reference(dtype):
    assert_cases_match(SPEC, dtype)


def test_matches_torch_fused_adamw_and_foreach_lerp_over_steps():
    torch.manual_seed(0)
    shapes = [(37, 5), (129,)]
    ref_p = [torch.randn(s) for s in shapes]
    p = [t.clone() for t in ref_p]
    ref_ema, ema = [t.clone() for t in ref_p], [t.clone() for t in ref_p]
    opt = torch.optim.AdamW([torch.nn.Parameter(t) for t in ref_p], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05,
                            eps=1e-8, fused=True)  # fmt: skip
    m, v = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
    copies = [torch.empty(s, dtype=torch.float16) for s in shapes]
    step = torch.zeros(())
    for _ in range(5):
        grads = [torch.randn(s) for s in shapes]
        for q, gr in zip(opt.param_groups[0]["params"], grads):
            q.grad = gr.clone()
        opt.step()
        torch._foreach_lerp_(ref_ema, [q.detach() for q in opt.param_groups[0]["params"]], 0.01)
        step += 1
        for i in range(len(shapes)):
            fused_adamw_ema(p[i], grads[i], m[i], v[i], ema[i], copies[i], step, lr=3e-3, beta1=0.9, beta2=0.95,
                            weight_decay=0.05, ema_decay=0.99, backend="triton")  # fmt: skip
    for i, q in enumerate(opt.param_groups[0]["params"]):
        torch.testing.assert_close(p[i], q.detach(), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(ema[i], ref_ema[i], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(m[i], opt.state[q]["exp_avg"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v[i], opt.state[q]["exp_avg_sq"], atol=1e-7, rtol=1e-5)
        assert torch.equal(copies[i], p[i].half())


def test_skip_leaves_everything_untouched():
    p, g, m, v, e = (torch.randn(50) for _ in range(5))
    v = v.abs()
    c = p.half()
    before = [t.clone() for t in (p, m, v, e, c)]
    fused_adamw_ema(p, g, m, v, e, c, torch.ones(()), lr=0.1, skip=torch.ones(()), backend="triton")
    assert all(torch.equal(a, b) for a, b in zip((p, m, v, e, c), before))
    fused_adamw_ema(p, g, m, v, e, c, torch.ones(()), lr=0.1, skip=torch.zeros(()), backend="triton")
    assert not any(torch.equal(a, b) for a, b in zip((p, m, v, e, c), before))


def test_meta_fake_and_min_bytes():
    p = torch.empty(1000, device="meta")
    out = fused_adamw_ema(p, torch.empty(1000, device="meta", dtype=torch.bfloat16), torch.empty_like(p),
                          torch.empty_like(p), torch.empty_like(p), torch.empty(1000, device="meta",
                          dtype=torch.bfloat16), torch.empty((), device="meta"), lr=1e-3, backend="triton")  # fmt: skip
    assert len(out) == 5 and out[0] is p
    args = (torch.empty(100), torch.empty(100, dtype=torch.bfloat16), torch.empty(100), torch.empty(100),
            torch.empty(100), torch.empty(100, dtype=torch.bfloat16))  # fmt: skip
    assert SPEC.min_bytes(args, {}, True) == 36 * 100  # the 36 B/param floor the roofline uses


def test_bad_input_names_the_argument():
    p = torch.randn(4, 3)
    with pytest.raises(ValueError, match="exp_avg must have the param's shape"):
        fused_adamw_ema(p, p.clone(), torch.zeros(3), torch.zeros(4, 3), None, None, torch.ones(()), lr=0.1)
    with pytest.raises(ValueError, match="param must be contiguous"):
        q = p.t()
        fused_adamw_ema(q, q.contiguous(), q.contiguous(), q.contiguous(), None, None, torch.ones(()), lr=0.1)


def test_grad_scale_equals_a_prescaled_gradient():
    """grad_scale c (the clip coefficient, read on the device) == the same update on the gradient c·g."""
    torch.manual_seed(1)
    p, g, m, v, e = (torch.randn(257) for _ in range(5))
    v = v.abs()
    c = torch.tensor(0.3)
    a = [t.clone() for t in (p, m, v, e)]
    b = [t.clone() for t in (p, m, v, e)]
    fused_adamw_ema(a[0], g, a[1], a[2], a[3], None, torch.full((), 4.0), lr=0.1, grad_scale=c, backend="triton")
    fused_adamw_ema(b[0], g * c, b[1], b[2], b[3], None, torch.full((), 4.0), lr=0.1, backend="triton")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    unscaled = p.clone()
    fused_adamw_ema(unscaled, g, m.clone(), v.clone(), None, None, torch.full((), 4.0), lr=0.1, backend="triton")
    assert not torch.allclose(unscaled, a[0])
