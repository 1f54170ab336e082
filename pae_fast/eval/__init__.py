"""Evaluation: generation metrics, tokenizer metrics and latent diffusability (docs/method.md § Evaluation
protocol, § Diffusability metrics).

- :mod:`~pae_fast.eval.inception`: the FID Inception-v3 (pt_inception-2015-12-05 layout, local weights).
- :mod:`~pae_fast.eval.fid`: FID, sFID, IS, precision/recall, FD_DINOv2, ``evaluate_generation``.
- :mod:`~pae_fast.eval.images`: ADM npz batches, reference statistics, image folders.
- :mod:`~pae_fast.eval.recon`: PSNR, SSIM, LPIPS, ``reconstruction_metrics`` (rFID).
- :mod:`~pae_fast.eval.diffusability`: VIV (+ time profile), LNC, SEC, LDS, CDS, SSC, LPC, GSQ, eRank, trajectories.
- :mod:`~pae_fast.eval.report`: the diffusability suite and its JSON / markdown / PNG report.

Submodules import torch; this package imports nothing, so ``import pae_fast.eval`` stays free.
"""
