"""A light decode head for plain ViTs: timm ``forward_intermediates`` + SETR-style progressive upsampling."""

from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class ProgressiveUpsamplingHead(nn.Module):
    """SETR-PUP with multi-level input: each ViT feature map is projected to ``channels`` by a 1x1 conv and the
    projections are summed; then ``stages`` times conv3x3 - GroupNorm - ReLU - 2x bilinear upsampling; then a 1x1
    classifier.

    Args:
        in_channels: channels of each input feature map (the ViT width).
        num_inputs: how many feature maps (blocks) come in.
        num_classes: logit channels (1 for a binary task).
        channels: width of the head.
        stages: 2x upsampling stages (SETR-PUP: 4 for patch 16).
    """

    def __init__(self, in_channels: int, num_inputs: int, num_classes: int, channels: int = 64, stages: int = 2) -> None:
        super().__init__()
        groups = math.gcd(8, channels)
        self.lateral = nn.ModuleList(nn.Conv2d(in_channels, channels, 1) for _ in range(num_inputs))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.GroupNorm(groups, channels),
                          nn.ReLU(inplace=True))
            for _ in range(stages))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.lateral):
            raise ValueError(f"the head takes {len(self.lateral)} feature maps, got {len(features)}")
        x = sum(proj(f) for proj, f in zip(self.lateral, features))  # (B, channels, h, w)
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)  # (B, channels, 2h, 2w)
        return self.classifier(x)  # (B, num_classes, h * 2^stages, w * 2^stages)


class ViTSegmenter(nn.Module):
    """A timm ViT encoder (``encoder``, adapted by SNELLA) with a progressive-upsampling ``decode_head`` (trained
    in full): images ``(B, 3, H, W)`` -> logits ``(B, num_classes, H, W)``.

    Args:
        encoder: a timm ViT with ``forward_intermediates`` (VisionTransformer, Eva, ...); its classifier head and
            the blocks after the last one used are pruned.
        num_classes: logit channels (1 for a binary task).
        indices: blocks whose outputs feed the head (default: 4 evenly spaced, the last included).
        channels: width of the head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, indices: Sequence[int] | None = None,
                 channels: int = 64) -> None:
        super().__init__()
        depth = len(encoder.blocks)
        if indices is None:
            count = min(4, depth)
            indices = sorted({depth - 1 - round(i * depth / count) for i in range(count)})
        indices = [int(i) for i in indices]
        if not indices or min(indices) < 0 or max(indices) >= depth:
            raise ValueError(f"indices={indices} must name blocks 0..{depth - 1} of the encoder")
        encoder.prune_intermediate_layers(indices, prune_norm=False, prune_head=True)
        self.encoder, self.indices = encoder, indices
        patch = encoder.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        stages = max(1, int(math.floor(math.log2(patch))))  # back to about half the input resolution or finer
        self.decode_head = ProgressiveUpsamplingHead(encoder.embed_dim, len(indices), num_classes, channels, stages)
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        features = self.encoder.forward_intermediates(images, indices=self.indices, norm=True, output_fmt="NCHW",
                                                      intermediates_only=True)  # K x (B, D, H/p, W/p)
        logits = self.decode_head(features)  # (B, C, h', w')
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)  # (B, C, H, W)
