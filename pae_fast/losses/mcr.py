"""MCR, the manifold-continuity regularizer with cascaded perturbation (docs/method.md §MCR).

Each latent token ``z_i`` (C channels) is moved on its sphere by the medium angle (42.5 deg) and the large angle
(85 deg) with ONE shared noise draw (:func:`pae_fast.kernels.sphere_perturb`; ``noise`` rule or exact ``geodesic``
rotation). The three decoder passes ``D(z), D(z_m), D(z_l)`` run as one concatenated batch, then

    cascaded:  L = d(x_m, sg(x_r)) + d(x_l, sg(x_m))
    medium:    L = d(x_m, sg(x_r))              large: L = d(x_l, sg(x_r))
    d(a, b) = ||a - b||_1 (mean) + LPIPS(a, b)   (the LPIPS part only when the LPIPS term is on)

LPIPS features are computed once per image batch and reused (docs/method.md § LPIPS fast path): same values.

``sg`` = stop-gradient: the anchor of each pair is detached, so the large pass is pulled to the medium one and
never straight to the anchor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pae_fast.losses.recon import l1_loss

__all__ = ["CASCADES", "mcr_angles_for", "mcr_step_seed", "mcr_perturb", "decode_concat", "mcr_losses"]

CASCADES = ("cascaded", "medium", "large")


def mcr_angles_for(angles: Sequence[float], cascade: str) -> tuple[float, ...]:
    """The angles actually drawn: ``(medium, large)`` cascaded, ``(medium,)`` or ``(large,)`` alone."""
    if cascade not in CASCADES:
        raise ValueError(f"tokenizer.mcr_cascade: expected one of {CASCADES}, got {cascade!r}")
    if len(angles) != 2:
        raise ValueError(f"tokenizer.mcr_angles: expected (medium, large) degrees, got {tuple(angles)}")
    medium, large = float(angles[0]), float(angles[1])
    return {"cascaded": (medium, large), "medium": (medium,), "large": (large,)}[cascade]


def mcr_step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The Philox seed of the MCR noise of one (run seed, optimizer step, process rank) (docs/method.md § MCR).

    ``(step, rank)`` is packed into 64 bits (``step << 32 | rank``), added to the run seed times an odd constant and
    mixed by the SplitMix64 finaliser, a bijection of 64-bit words: for one run seed, every ``(step, rank)`` with
    ``0 <= step, rank < 2**32`` gets a different seed at ANY world size (no ``rank < world`` assumption), and a
    resumed run draws the same noise again. Returns a signed 64-bit int.
    """
    step, rank = int(step), int(rank)
    if not (0 <= step < 2**32 and 0 <= rank < 2**32):
        raise ValueError(f"mcr_step_seed: step {step} and rank {rank} must lie in [0, 2**32)")
    x = (int(seed) * 0x9E3779B97F4A7C15 + ((step << 32) | rank)) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    x ^= x >> 31
    return x - 2**64 if x >= 2**63 else x


def mcr_perturb(
    z: torch.Tensor,
    angles: Sequence[float],
    seed: int | torch.Tensor,
    mode: str = "noise",
    backend: str | None = None,
) -> tuple[torch.Tensor, ...]:
    """Perturbed latents, one per angle, all from one noise draw per token.

    Args:
        z: ``(B, C, H, W)`` latent (tokens are the C-vectors at each grid position).
        angles: degrees.
        seed: Philox seed of the noise (vary it per step; a 0-dim int tensor avoids host syncs).
        mode: ``"noise"`` or ``"geodesic"``.
    Returns:
        one ``(B, C, H, W)`` tensor per angle, differentiable w.r.t. ``z``.
    """
    from pae_fast.kernels import sphere_perturb

    if z.dim() != 4:
        raise ValueError(f"mcr_perturb: expected a (B, C, H, W) latent, got shape {tuple(z.shape)}")
    outs = sphere_perturb(z.permute(0, 2, 3, 1), tuple(angles), seed=seed, mode=mode, backend=backend)
    return tuple(o.permute(0, 3, 1, 2) for o in outs)


def decode_concat(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Run several decoder passes as one batch: ``decode(cat(latents))`` split back.

    Args:
        decode: ``(B', C, H, W) -> (B', 3, H_img, W_img)``.
        latents: tensors of one shape ``(B, C, H, W)``.
    Returns:
        one ``(B, 3, H_img, W_img)`` reconstruction per latent, in order.
    """
    sizes = [t.shape[0] for t in latents]
    out = decode(torch.cat(list(latents), dim=0) if len(latents) > 1 else latents[0])
    return list(out.split(sizes, dim=0))


def _pair(a: torch.Tensor, anchor: torch.Tensor, lpips_distances: torch.Tensor | None) -> torch.Tensor:
    d = l1_loss(a, anchor.detach())
    return d if lpips_distances is None else d + lpips_distances.mean()


def mcr_losses(
    recon: torch.Tensor, perturbed: Sequence[torch.Tensor], cascade: str, lpips=None,
    recon_features: Sequence[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The MCR pair terms.

    LPIPS runs its trunk once per image batch (docs/method.md § LPIPS fast path): each perturbed reconstruction with
    grad, its distance to the detached features of its anchor computed in the same pass, and its features kept as the
    next pair's anchor (``x_m`` in the cascade); the reconstruction's features serve only as a detached anchor.

    Args:
        recon: ``(B, 3, H, W)`` reconstruction of the clean latent (anchor; detached here).
        perturbed: decoded perturbed latents, in :func:`mcr_angles_for` order.
        cascade: ``"cascaded" | "medium" | "large"``.
        lpips: the frozen LPIPS module, or None (L1 only).
        recon_features: ``lpips.features(recon)`` when the caller has them already (the reconstruction term's; used
            detached); None: computed here without grad.
    Returns:
        ``{"mcr_medium"?, "mcr_large"?}`` 0-dim terms (each ``L1 + LPIPS`` against its stop-gradient anchor).
    """
    if cascade not in CASCADES:
        raise ValueError(f"tokenizer.mcr_cascade: expected one of {CASCADES}, got {cascade!r}")
    want = 2 if cascade == "cascaded" else 1
    if len(perturbed) != want:
        raise ValueError(f"mcr_losses: cascade {cascade!r} needs {want} perturbed reconstruction(s), "
                         f"got {len(perturbed)}")  # fmt: skip
    dists: list[torch.Tensor | None] = [None] * want  # per-image LPIPS of each pair
    if lpips is not None:
        feats = recon_features
        if feats is None:
            with torch.no_grad():
                feats = lpips.features(recon)
        for i, x in enumerate(perturbed):  # each pair's anchor is the one before it in the cascade (recon first)
            feats, dists[i] = lpips.features_distance(x, feats)
    if cascade == "cascaded":
        x_m, x_l = perturbed
        return {"mcr_medium": _pair(x_m, recon, dists[0]), "mcr_large": _pair(x_l, x_m, dists[1])}
    return {f"mcr_{cascade}": _pair(perturbed[0], recon, dists[0])}
