"""LPIPS, the learned perceptual image patch similarity (Zhang et al., 2018): a training loss of the tokenizer
(docs/method.md § L1 and LPIPS) and a held-out metric (:mod:`pae_fast.eval.recon` imports it from here).

VGG-16 or AlexNet features (torchvision layer layout) at five ReLU stages, unit-normalised over channels, squared
differences weighted by non-negative 1x1 "lin" layers, spatially averaged and summed. Weights come from local files:
the official ``v0.1`` heads (``lin{k}.model.1.weight``) and a torchvision backbone state dict (``features.*``), or
one pae_fast LPIPS state dict. Without files the weights are random (tests; the values are then only a
distance-like function, not the perceptual metric).
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

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

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, ends = [], set(self.stage_ends)
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in ends:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance per image.

        Args:
            x, y: ``(B, 3, H, W)`` images in [0, 1].
        Returns:
            ``(B,)`` LPIPS distances (0 for identical images, symmetric).
        """
        check_pair(x, y, "LPIPS")
        fx = self._features(((x * 2 - 1) - self.shift) / self.scale)
        fy = self._features(((y * 2 - 1) - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for lin, a, b in zip(self.lins, fx, fy):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean((1, 2, 3))
        return total
