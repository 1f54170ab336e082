"""Tools over the fused ops (not ops themselves): traffic counting, compile checks, validation, the op table.

- :mod:`.testing`: compare an op with its reference, forward and every gradient (tests, ``validate``).
- :mod:`.traffic`: count memory traffic and FLOPs of a model step on the meta device (``benchmarks/roofline.py``).
- :mod:`.compile_check`: compile every kernel launch for sm_90 without a GPU (``--ptxas``: registers, spills).
- :mod:`.validate`, :mod:`.info`: the ``python -m pae_fast.kernels.validate`` / ``.info`` commands.
"""
