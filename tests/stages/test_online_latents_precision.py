"""Online latent encoding runs under the engine's precision -> dtype mapping (``engine.precision.autocast_dtype``),
``bf16-autocast`` included."""

from __future__ import annotations

import pytest
import torch

from pae_fast.engine.precision import PRECISIONS, autocast_dtype
from pae_fast.stages.online_latents import _autocast


@pytest.mark.parametrize("precision", PRECISIONS)
def test_online_encoding_autocasts_like_the_engine(precision):
    want = autocast_dtype(precision)
    with _autocast(torch.device("cpu"), precision):
        on = torch.is_autocast_enabled("cpu")
        got = torch.get_autocast_dtype("cpu") if on else None
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert on == (want is not None) and got == want
    assert y.dtype == (want or torch.float32)


def test_bf16_autocast_is_bf16_and_unknown_precisions_are_refused():
    with _autocast(torch.device("cpu"), "bf16-autocast"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="train.precision"):
        _autocast(torch.device("cpu"), "fp8")
