"""LPIPS, the learned perceptual image patch similarity (Zhang et al., 2018): a training loss of the tokenizer
(docs/method.md § L1 and LPIPS) and a held-out metric (:mod:`pae_fast.eval.recon` imports it from here).

VGG-16 or AlexNet features (torchvision layer layout) at five ReLU stages, unit-normalised over channels, squared
differences weighted by non-negative 1x1 "lin" layers, spatially averaged and summed. Weights come from local files:
the official ``v0.1`` heads (``lin{k}.model.1.weight``) and a torchvision backbone state dict (``features.*``), or
one pae_fast LPIPS state dict. Without files the weights are random (tests; the values are then only a
distance-like function, not the perceptual metric).

Fast path (docs/method.md § LPIPS fast path): :meth:`LPIPS.features`, :meth:`LPIPS.distance` and
:meth:`LPIPS.features_distance` split the forward so a loss runs the trunk once per image batch and reuses its
features (detached) as the anchor of another distance; after :meth:`LPIPS.to_compute_dtype` the trunk holds its one
copy of frozen weights in the training compute dtype (bf16), channels-last. Each stage's distance is a fused kernel
(fp32 accumulation, fp32 result): :func:`pae_fast.kernels.lpips_distance` between two feature maps, or
:func:`pae_fast.kernels.lpips_relu_distance`, the stage's closing ReLU and its distance to a detached anchor in one
autograd node. VGG-16's four 2x2 max-pools run :func:`pae_fast.kernels.maxpool2x2` (no saved indices; the module's
layers and state-dict keys stay torchvision's); in :meth:`LPIPS.features_distance` the pool that follows a stage's
closing ReLU runs inside that stage's kernel (:func:`pae_fast.kernels.lpips_relu_distance_pool`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.modules.utils import _pair

from pae_fast.weights import load_state_dict_file

__all__ = ["LPIPS", "check_pair"]


def check_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Two ``(B, C, H, W)`` tensors of one shape, or a ValueError naming ``what``."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"{what}: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )


# Index of the ReLU ending each of the five stages in torchvision's ``features`` Sequential, and their widths.
_STAGES = {
    "vgg": ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    "alex": ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),  # relu1 .. relu5
}


def _is_pool2x2(layer: nn.Module) -> bool:
    """``nn.MaxPool2d(2, 2)`` (VGG-16's pools, which :func:`pae_fast.kernels.maxpool2x2` computes); AlexNet's 3x3 / 2
    pools are not."""
    if not isinstance(layer, nn.MaxPool2d) or layer.ceil_mode or layer.return_indices:
        return False
    return all(_pair(v) == want for v, want in
               ((layer.kernel_size, (2, 2)), (layer.stride, (2, 2)), (layer.padding, (0, 0)), (layer.dilation, (1, 1))))


def _backbone(net: str) -> nn.Sequential:
    import torchvision

    if net == "vgg":
        # only the convolutional part (the classifier of vgg16 is 120M parameters we never use)
        return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=False)
    return torchvision.models.alexnet(weights=None).features


class LPIPS(nn.Module):
    """Learned perceptual image patch similarity.

    Args:
        net: ``"vgg"`` (VGG-16) or ``"alex"`` (AlexNet).
        weights: file with the linear heads (official ``lin{k}.model.1.weight`` keys) and/or a whole pae_fast
            LPIPS state dict (``net.*``, ``lins.*``).
        backbone_weights: torchvision ``vgg16`` / ``alexnet`` state dict (``features.*`` keys) for the backbone.

    Without any file the weights are random (heads non-negative). The module is frozen (eval, no grad on its
    parameters) but differentiable with respect to its inputs, so it also serves as a loss.
    """

    # Input scaling of the official implementation (inputs in [-1, 1]).
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(
        self,
        net: str = "vgg",
        weights: str | os.PathLike | None = None,
        backbone_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if net not in _STAGES:
            raise ValueError(f"LPIPS net must be one of {sorted(_STAGES)}, got {net!r}")
        self.net_name = net
        self.stage_ends, widths = _STAGES[net]
        self.net = _backbone(net)[: self.stage_ends[-1] + 1]
        assert all(isinstance(self.net[i], nn.ReLU) for i in self.stage_ends)  # features_distance fuses them
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        with torch.no_grad():
            for lin in self.lins:
                lin.weight.uniform_(0, 2 / lin.in_channels)  # random but non-negative, like trained heads
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        files = [f for f in (weights, backbone_weights) if f is not None]
        if files:
            self.load_files(*files)
        self.eval().requires_grad_(False)

    def load_files(self, *paths: str | os.PathLike) -> None:
        """Load official / torchvision / pae_fast weight files; together they must cover every parameter."""
        merged: dict[str, torch.Tensor] = {}
        for p in paths:
            for k, v in load_state_dict_file(p, "LPIPS weights").items():
                if m := re.fullmatch(r"lin(\d)\.model\.1\.weight", k):  # official v0.1 heads
                    merged[f"lins.{m.group(1)}.weight"] = v
                elif k.startswith("features."):  # torchvision backbone
                    idx = int(k.split(".")[1])
                    if idx <= self.stage_ends[-1]:
                        merged["net." + k[len("features.") :]] = v
                elif k.startswith(("net.", "lins.")):
                    merged[k] = v
        own = self.state_dict()
        missing = sorted(set(own) - set(merged))
        if missing:
            raise ValueError(
                f"LPIPS ({self.net_name}) weights from {', '.join(map(str, paths))} do not cover {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}: give the official heads file (eval.lpips_weights) and the "
                f"torchvision {'vgg16' if self.net_name == 'vgg' else 'alexnet'} backbone (eval.lpips_backbone_weights)"
            )
        for k, v in merged.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"LPIPS weights: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict({k: merged[k] for k in own})

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the VGG / AlexNet trunk's weights: the dtype :meth:`features` runs in."""
        return self.net[0].weight.dtype

    @property
    def channels_last(self) -> bool:
        """Whether the trunk's weights are channels-last (after :meth:`to_compute_dtype`); :meth:`features` feeds it
        images in the same layout, so no convolution converts a weight per call."""
        return self.net[0].weight.is_contiguous(memory_format=torch.channels_last)

    def to_compute_dtype(self, dtype: torch.dtype) -> LPIPS:
        """Keep the trunk's frozen weights in ``dtype`` (one copy, converted once: no per-step cast), channels-last:
        the training loss's layout. A new module is NCHW (its state dict is contiguous, as saved files want).

        The lin heads stay fp32 (1,472 numbers, read by the fp32 distance). Replaces the parameters (so it works on
        fake tensors too); returns ``self``.
        """
        for m in self.net.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_floating_point():
                    fmt = torch.channels_last if p.dim() == 4 else torch.preserve_format
                    m._parameters[name] = nn.Parameter(p.detach().to(dtype, memory_format=fmt), requires_grad=False)
        return self

    def features(self, x: torch.Tensor, backend: str | None = None) -> list[torch.Tensor]:
        """The five stage features of images ``x (B, 3, H, W)`` in [0, 1] (docs/method.md § LPIPS fast path).

        The input scaling runs in fp32, then the scaled images are cast once to :attr:`compute_dtype`, in the trunk's
        layout (:attr:`channels_last`). ``backend`` picks the kernels of VGG-16's 2x2 max-pools
        (:func:`pae_fast.kernels.maxpool2x2`).
        Returns:
            ``[(B, C_k, H_k, W_k)]`` for k = 1..5 in the compute dtype (differentiable w.r.t. ``x``).
        """
        return self._trunk(x, None, backend)[0]

    def features_distance(self, x: torch.Tensor, anchor: Sequence[torch.Tensor], backend: str | None = None
                          ) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
        """:meth:`features` of ``x`` and their :meth:`distance` to fixed ``anchor`` features, in one trunk pass: each
        stage's closing ReLU is fused with that stage's distance (:func:`pae_fast.kernels.lpips_relu_distance`), so
        one autograd node receives both gradients of the stage's features (docs/method.md § LPIPS fast path); where
        a 2x2 max-pool follows (VGG-16 stages 1-4) it runs in the same kernel
        (:func:`pae_fast.kernels.lpips_relu_distance_pool`).

        Args:
            x: ``(B, 3, H, W)`` images in [0, 1] (the differentiable side).
            anchor: :meth:`features` of the other side, used detached (no gradient reaches them).
        Returns:
            ``(features of x, (B,) fp32 distances)``; the values of ``distance(features(x), anchor)``.
        """
        if len(anchor) != len(self.lins):
            raise ValueError(f"LPIPS.features_distance: expected {len(self.lins)} anchor stage features, got "
                             f"{len(anchor)}")  # fmt: skip
        feats, total = self._trunk(x, [a.detach() for a in anchor], backend)
        return feats, total

    def _trunk(self, x: torch.Tensor, anchor: list[torch.Tensor] | None, backend: str | None
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:  # fmt: skip
        from pae_fast.kernels import lpips_relu_distance, lpips_relu_distance_pool, maxpool2x2

        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS: expected (B, 3, H, W) images, got {tuple(x.shape)}")
        x = ((x * 2 - 1) - self.shift) / self.scale
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(dtype=self.compute_dtype, memory_format=fmt)
        feats: list[torch.Tensor] = []
        total = None
        n = len(self.net)
        i = 0
        while i < n:
            layer = self.net[i]
            if i in self.stage_ends and anchor is not None:  # the stage's closing ReLU, fused with its distance
                k = len(feats)
                w = self.lins[k].weight.view(-1)
                if i + 1 < n and _is_pool2x2(self.net[i + 1]):  # ... and with the next stage's pool (VGG stages 1-4)
                    y, d, x = lpips_relu_distance_pool(x, anchor[k], w, backend=backend)
                    i += 1
                else:
                    x, d = lpips_relu_distance(x, anchor[k], w, backend=backend)
                    y = x
                total = d if total is None else total + d
                feats.append(y)
            else:
                if _is_pool2x2(layer):  # VGG-16's 2x2 / 2 pools, index-free (docs/method.md § LPIPS fast path)
                    x = maxpool2x2(x, backend=backend)
                else:
                    x = layer(x)
                if i in self.stage_ends:
                    feats.append(x)
            i += 1
        return feats, total

    def distance(self, fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor],
                 backend: str | None = None) -> torch.Tensor:  # fmt: skip
        """LPIPS distance per image of two :meth:`features` lists: the sum over the five stages of
        :func:`pae_fast.kernels.lpips_distance` (channel unit-norm, squared difference, lin head, spatial mean).

        Returns:
            ``(B,)`` fp32 (fp64 for an fp64 trunk), differentiable w.r.t. both feature lists.
        """
        from pae_fast.kernels import lpips_distance

        if len(fa) != len(self.lins) or len(fb) != len(self.lins):
            raise ValueError(f"LPIPS.distance: expected {len(self.lins)} stage features per side, got {len(fa)}, "
                             f"{len(fb)}")  # fmt: skip
        total = None
        for lin, a, b in zip(self.lins, fa, fb):
            d = lpips_distance(a, b, lin.weight.view(-1), backend=backend)
            total = d if total is None else total + d
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image.

        Args:
            x, y: ``(B, 3, H, W)`` images in [0, 1].
        Returns:
            ``(B,)`` LPIPS distances in fp32 (0 for identical images, symmetric).
        """
        check_pair(x, y, "LPIPS")
        return self.distance(self.features(x), self.features(y))

