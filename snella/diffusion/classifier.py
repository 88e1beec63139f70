"""The MNIST classifier that scores generated digits: its features define the Frechet distance, its labels the accuracy.

Inception weights cannot be downloaded here, so the distance is measured in the 128-d penultimate features of this
small CNN, trained on the real MNIST digits of mnist5k's training split (``python -m snella.diffusion.pretrain
classifier``; the weights ship in snella/assets). Inputs are grey 28x28 images in [-1, 1], as the denoisers produce.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_FILE = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"
CLASSIFIER_SIZE = 28
CLASSIFIER_CLASSES = tuple(str(d) for d in range(10))  # mnist5k's class names


class DigitClassifier(nn.Module):
    """Two conv blocks and a 128-d feature layer, then a 10-way linear head (LeNet-like, 0.4M parameters)."""

    num_features = 128  # torchmetrics' FID reads this instead of probing the network with a dummy input

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128) of grey images (B, 1, H, W) in [-1, 1] (resized to 28x28 when not)."""
        return self.body(fit_input(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(images))


class FeatureExtractor(nn.Module):
    """The classifier's features as torchmetrics' FID wants its ``feature`` network: images in, (B, d) out."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def fit_input(images: torch.Tensor) -> torch.Tensor:
    """Images as the classifier reads them: one grey channel (the mean of RGB), 28x28 (bilinear), float."""
    x = images.float()
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)  # (B, 1, H, W)
    if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        x = F.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
    return x


def load_classifier(path: Path | str = CLASSIFIER_FILE) -> DigitClassifier:
    """The shipped classifier (eval mode, frozen)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the scoring classifier {path} does not exist yet: it is written by "
                                "`python -m snella.diffusion.pretrain classifier`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
