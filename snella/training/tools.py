"""What one does with a finished run: evaluate it on a dataset, predict labels of images, merge it into a timm model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from snella.training.runs import find_images, load_run


def evaluate(run: str, data: Optional[str] = None, split: str = "test", batch_size: int = 256,
             precision: str = "fp32", device: str = "auto", limit: Optional[int] = None) -> dict[str, Any]:
    """The metrics of a run's tuned model on a dataset split, as its task measures them (classification:
    accuracy; images of another size are resized to the model's input).

    Args:
        run: the run's output folder.
        data: dataset source (default: the one the run trained on); its classes must match the run's.
        split: "train", "val", "trainval" or "test".
        batch_size: images per forward pass.
        precision: "fp32" or "bf16" (autocast).
        device: "auto", "cpu", "cuda" or "cuda:N".
        limit: score only this many images (the same fixed subset as --test-limit).

    Returns:
        classification: {"accuracy", "images", "data", "split", "run"}.
    """
    loaded = load_run(run, device)
    return loaded.task.evaluate_run(loaded, data, split, batch_size, precision, limit)


def predict(run: str, images: list[str], top_k: int = 5, batch_size: int = 256, precision: str = "fp32",
            device: str = "auto", output_dir: Optional[str] = None) -> list[dict[str, Any]]:
    """The run's task's prediction for each image (classification: the ``top_k`` most likely labels).

    Every image, of any size and mode, goes through the run's eval transform with ``fit_size``: to the
    run's channels, resized to its input size when it has another, normalised as in training.

    Args:
        run: the run's output folder.
        images: image files and/or folders (searched recursively).
        top_k: labels per image (at most the number of classes).
        output_dir: where a task that writes files (segmentation: mask PNGs) writes them; None: its default
            (``<run>/predictions``). Refused for classification, which writes nothing.

    Returns:
        classification: one {"file", "top": [{"label", "index", "probability"}, ...]} per image, most likely first.

    Raises:
        FileNotFoundError: a missing path or no image at all.
        snella.data.BadImageError: an unreadable image (the message names it).
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; accepted: a positive integer")
    loaded = load_run(run, device)
    if output_dir is not None and not loaded.task.writes_predictions:
        raise ValueError(f"output_dir={output_dir!r} is not read for a {loaded.task.name} run: its predictions are "
                         "printed, not written; accepted: no output_dir")
    files = find_images(images)
    if output_dir is None:
        return loaded.task.predict(loaded, files, top_k, batch_size, precision)
    return loaded.task.predict(loaded, files, top_k, batch_size, precision, output_dir=Path(output_dir))


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
    return loaded.task.export(loaded, path)
