"""The FID Inception-v3 network (the TensorFlow "2015-12-05" graph used by TTUR, pytorch-fid and ADM's evaluator).

Layers and parameter names follow the torchvision Inception-v3 layout that the public PyTorch port of that graph
(``pt_inception-2015-12-05-*.pth``) uses, so its weights load from a local file by key name. Differences from the
classification Inception-v3, all properties of the TF graph:

- the average pools inside the mixed blocks do not count padding (TF "SAME" average pooling),
- the last block (``Mixed_7c``) pools its pool branch with a max pool,
- 1008 output classes; ADM's Inception Score uses ``pool_3 @ W`` without the bias, and so do we.

Preprocessing follows ADM's evaluator, which feeds uint8 images into the graph: TF-1 bilinear resize to 299
(``align_corners=False`` without half-pixel centres), then ``(x - 128) / 128``.

Outputs per image: ``pool`` (2048-d ``pool_3``), ``logits`` (1008-d), ``spatial`` (ADM's sFID features: the
first 7 channels of ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` after BN+ReLU, 17x17 at 299 input, flattened in
TF's HWC order -> 2023-d).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pae_fast.weights import load_state_dict_file  # re-exported: the FID / LPIPS weight readers use it

__all__ = ["FIDInceptionV3", "load_inception", "tf1_resize_bilinear", "load_state_dict_file"]


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF "SAME" average pooling divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (c7 = width of the 7x7 towers)."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 heads; ``max_pool`` selects the TF graph's last-block pooling."""

    def __init__(self, cin: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _tf1_resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    n_in = x.shape[dim]
    if n_in == size:
        return x
    # TF-1 ResizeBilinear (align_corners=False, no half-pixel centres): source = dst * in / out.
    src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    frac = (src - i0.double()).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = size
    frac = frac.view(shape)
    return x.index_select(dim, i0) * (1 - frac) + x.index_select(dim, i1) * frac


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TF-1's ``ResizeBilinear`` with ``align_corners=False`` (the FID graph's resize).

    Args:
        x: ``(B, C, H, W)`` float.
        size: output height and width.
    Returns:
        ``(B, C, size, size)``.
    """
    return _tf1_resize_axis(_tf1_resize_axis(x, size, 2), size, 3)


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID graph; ``forward`` returns pool features, logits and sFID spatial features.

    Args:
        input_size: images are resized to ``input_size`` (299 = the FID protocol; the network accepts >= 75).
        num_classes: 1008 for the public weights.
    """

    SPATIAL_CHANNELS = 7

    def __init__(self, input_size: int = 299, num_classes: int = 1008) -> None:
        super().__init__()
        if input_size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75x75, got input_size={input_size}")
        self.input_size = input_size
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)
        # He initialisation keeps activations at unit scale through the 94 conv layers when no weights are loaded
        # (tests with random weights); the default conv init shrinks them to ~1e-8 by pool_3.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 in [0, 255] or float in [0, 1] -> the network input ``(B, 3, S, S)``."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
        x = tf1_resize_bilinear(x, self.input_size)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of a batch of images.

        Args:
            images: ``(B, 3, H, W)``, uint8 in [0, 255] or float in [0, 1].
        Returns:
            ``pool (B, 2048)``, ``logits (B, num_classes)`` (no bias, as ADM's IS), ``spatial (B, 7*h*w)``.
        """
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        # sFID: TF's "mixed_6/conv" is the 1x1 branch of the 4th 17x17 block (Mixed_6d) after BN+ReLU.
        spatial = self.Mixed_6d.branch1x1(x)[:, : self.SPATIAL_CHANNELS]
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # TF's NHWC flattening order, (B, h*w*7)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool_3, (B, 2048)
        logits = pool @ self.fc.weight.t()
        return {"pool": pool, "logits": logits, "spatial": spatial}


def load_inception(
    weights: str | os.PathLike | None, input_size: int = 299, device: str | torch.device = "cpu"
) -> FIDInceptionV3:
    """The FID Inception-v3 in eval mode with weights from a local file.

    Args:
        weights: the PyTorch port of the FID graph (``pt_inception-2015-12-05-6726825d.pth``) or a safetensors
            copy of it. Required: random weights give meaningless FIDs.
        input_size: network input size (299 for the protocol).
        device: where the network runs.
    """
    if weights is None:
        raise FileNotFoundError(
            "FID needs the Inception weights: set eval.inception_weights to a local copy of "
            "pt_inception-2015-12-05-6726825d.pth (the pytorch-fid port of the TF FID graph)"
        )
    sd = load_state_dict_file(weights, "Inception weights")
    model = FIDInceptionV3(input_size=input_size)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        raise ValueError(
            f"Inception weights {weights} do not match the FID Inception-v3 layout: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in model.state_dict().items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"Inception weights {weights}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}"
            )
    model.load_state_dict(sd, strict=False)
    return model.eval().requires_grad_(False).to(device)
