"""What one does with a finished run: evaluate it on a dataset, predict labels of images, merge it into a timm model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from snella.data import load_dataset
from snella.data.checks import open_image
from snella.training.data import prepare
from snella.training.evaluation import accuracy, logits_of, probabilities
from snella.training.export import json_path, write_merged
from snella.training.runs import find_images, load_run, merged_model


def evaluate(run: str, data: Optional[str] = None, split: str = "test", batch_size: int = 256,
             precision: str = "fp32", device: str = "auto", limit: Optional[int] = None) -> dict[str, Any]:
    """Accuracy of a run's tuned model on a dataset split (images of another size resized to the model's input).

    Args:
        run: the run's output folder.
        data: dataset source (default: the one the run trained on); its classes must match the run's.
        split: "train", "val", "trainval" or "test".
        batch_size: images per forward pass.
        precision: "fp32" or "bf16" (autocast).
        device: "auto", "cpu", "cuda" or "cuda:N".
        limit: score only this many images (the same fixed subset as --test-limit).

    Returns:
        {"accuracy", "images", "data", "split", "run"}.
    """
    loaded = load_run(run, device)
    source = data or loaded.config.data
    dataset = load_dataset(source, split, None, skip_bad_images=loaded.config.skip_bad_images,
                           seed=loaded.config.seed)
    if dataset.num_classes != len(loaded.classes):
        raise ValueError(f"{source} has {dataset.num_classes} classes, the run in {run} was trained on "
                         f"{len(loaded.classes)} ({loaded.classes[:10]})")
    dataset = prepare(dataset, loaded.spec, train=False, limit=limit, fit_size=True)
    acc, seen = accuracy(loaded.model, dataset, batch_size, loaded.device, precision)
    return {"accuracy": acc, "images": seen, "data": source, "split": split, "run": str(run)}


def predict(run: str, images: list[str], top_k: int = 5, batch_size: int = 256, precision: str = "fp32",
            device: str = "auto") -> list[dict[str, Any]]:
    """The ``top_k`` most likely labels of each image, with their probabilities.

    Every image, of any size and mode, goes through the run's eval transform with ``fit_size``: to the
    run's channels, resized to its input size when it has another, normalised as in training.

    Args:
        run: the run's output folder.
        images: image files and/or folders (searched recursively).
        top_k: labels per image (at most the number of classes).

    Returns:
        One {"file", "top": [{"label", "index", "probability"}, ...]} per image, most likely first.

    Raises:
        FileNotFoundError: a missing path or no image at all.
        snella.data.BadImageError: an unreadable image (the message names it).
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; accepted: a positive integer")
    loaded = load_run(run, device)
    transform = loaded.spec.build(train=False, fit_size=True)
    files = find_images(images)
    stack = torch.stack([transform(open_image(str(f), transform.image_mode)) for f in files])  # (N, C, H, W)
    probs = probabilities(loaded.model, stack, loaded.device, precision, batch_size)  # (N, num_classes)
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [{"file": str(f), "top": [{"label": loaded.classes[i], "index": int(i), "probability": float(p)}
                                     for p, i in zip(v.tolist(), ix.tolist())]}
            for f, v, ix in zip(files, values, indices)]


def merge(run: str, output: str) -> dict[str, Any]:
    """Fold a run's adapter into its backbone and write a plain checkpoint that loads without snella.

    Writes ``output`` (a safetensors state dict, mode 0666 & ~umask) and ``output`` with suffix .json
    (how to build the architecture: ``timm.models.VisionTransformer(**vit_kwargs)`` or
    ``timm.create_model(**create_model)``; for a Hugging Face run (``hf:`` model) its transformers
    config, ``transformers_config``; plus the classes, the input transform and a "load" line).

    Args:
        run: the run's output folder.
        output: the .safetensors file to write.

    Returns:
        The JSON written, with "max_abs_logit_diff": the largest difference between the tuned and the
        merged model's logits on a test batch.
    """
    path = Path(output)
    if path.suffix != ".safetensors":
        raise ValueError(f"output={output!r} is invalid; accepted: a file name ending in .safetensors")
    loaded = load_run(run, "cpu")
    channels, size = loaded.spec.channels, loaded.spec.image_size
    example = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(0))  # (4, C, H, W)
    with torch.no_grad():
        tuned = logits_of(loaded.model(example))
        merged = merged_model(loaded)
        diff = float((logits_of(merged(example)) - tuned).abs().max())
    architecture = "vit_fmnist_d128" if loaded.config.model == "snella-default" else loaded.config.model
    info = write_merged(merged, architecture, path, example,
                        {"classes": loaded.classes, "input": loaded.spec.to_dict(), "max_abs_logit_diff": diff,
                         "run": str(run)})
    return {**info, "json": str(json_path(path)), "output": str(path)}
