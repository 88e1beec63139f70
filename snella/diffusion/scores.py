"""Scores of generated images: the Frechet distance in the MNIST classifier's features, and its accuracy on samples.

The distance is torchmetrics' ``FrechetInceptionDistance`` with the project's classifier as its ``feature`` network
(Inception weights cannot be downloaded here). Each process adds its share of real and generated images; the
metric's sums (features, their outer products, counts) are all-reduced before the distance is computed, so every
rank returns the same number.
"""

from __future__ import annotations

from typing import Optional

import torch

from snella.diffusion.classifier import DigitClassifier, FeatureExtractor
from snella.training.distributed import DistContext, all_reduce_sum

STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples", "fake_features_sum",
          "fake_features_cov_sum", "fake_features_num_samples")


class SampleScores:
    """Accumulates real and generated images of one evaluation; ``compute`` gives the distance and the accuracy."""

    def __init__(self, classifier: DigitClassifier, batch_size: int = 250):
        from torchmetrics.image.fid import FrechetInceptionDistance

        # sync_on_compute=False: the sums are reduced here, explicitly, over the run's own process group
        self.fid = FrechetInceptionDistance(feature=FeatureExtractor(classifier), sync_on_compute=False)
        self.classifier, self.batch_size = classifier, batch_size
        self.correct, self.scored = 0, 0

    @torch.no_grad()
    def add(self, images: torch.Tensor, real: bool, expected: Optional[torch.Tensor] = None) -> None:
        """Add images (N, C, H, W) in [-1, 1] (CPU); ``expected``: the classifier labels generated ones should get."""
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size].float()
            self.fid.update(chunk, real=real)
            if expected is not None:
                guess = self.classifier(chunk).argmax(1)  # (B,)
                self.correct += int((guess == expected[start:start + self.batch_size]).sum())
                self.scored += len(chunk)

    def compute(self, ctx: Optional[DistContext] = None) -> dict[str, Optional[float]]:
        """``frechet_distance`` (over every rank's images) and ``sample_accuracy`` (None when nothing was scored)."""
        counts = torch.tensor([self.correct, self.scored], dtype=torch.float64)
        if ctx is not None:
            for name in STATES:
                reduced = all_reduce_sum(ctx, getattr(self.fid, name).to(ctx.device)).cpu()
                setattr(self.fid, name, reduced)
            counts = all_reduce_sum(ctx, counts.to(ctx.device)).cpu()
        distance = float(self.fid.compute())
        return {"frechet_distance": distance,
                "sample_accuracy": float(counts[0] / counts[1]) if counts[1] > 0 else None}
