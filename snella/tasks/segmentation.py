"""Semantic segmentation as a task: an encoder SNELLA adapts, a decoder trained in full, per-pixel losses and metrics.

Data: ``--data fmnist-composites`` (the embedded default), ``liver``, ``seg:<folder>``, ``hf:<folder>``
(``snella.segmentation.sources``). Models: ``snella.segmentation.models.build_segmentation_model`` (``--decoder``).
Every split is read once and held as tensors at the model's input (``--transform resize``, the default);
``--transform flip-crop`` (for photos and scans: polyps, CT) also crops and flips image and mask together per batch, drawn from the loop's generator (seeded by seed, epoch and
rank), so a resumed run sees the same crops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from snella.data.checks import open_image
from snella.segmentation.losses import SegmentationLoss
from snella.segmentation.metrics import SegmentationMetrics, predictions
from snella.segmentation.sources import cached_split, flip_crop, load_source, native_size
from snella.tasks.base import StepOutput, Task, TaskData, register_task
from snella.training.config import TrainConfig
from snella.training.data import batches, shard
from snella.training.distributed import DistContext, all_reduce_sum
from snella.training.evaluation import autocast
from snella.training.runs import Run, merged_model

OVERLAYS_PLOT = "overlays.png"
CURVES_PLOT = "curves.png"  # as classification's: loss, train pixel accuracy and val mIoU per epoch
OVERLAY_IMAGES = 4
PREDICTIONS_DIR = "predictions"  # `snella predict` writes its mask PNGs here, in the run folder
BINARY_MEASURES = (("mae", "MAE"), ("s_measure", "S-measure"), ("e_measure_mean", "E-measure"),
                   ("weighted_f", "weighted F"))


@register_task
class SegmentationTask(Task):
    """One label per pixel; binary masks get one logit per pixel (BCE + Dice), label maps one per class (CE)."""

    name = "segmentation"
    # The embedded default: `snella finetune --task segmentation` in under 5 minutes on 2 CPU cores. No random
    # crops: a resized crop changes the items' scale, and the ViT (pretrained on 28 px items) learned class
    # identity from whole items at one scale; on the composites the crops cost half the mIoU (dev runs: 19.7%
    # linear with flip-crop, 38.7% with resize, 10 epochs). Then the training set, not the augmentation, limits.
    defaults = {"data": "fmnist-composites", "transform": "resize", "random_shift": 0, "epochs": 8,
                "batch_size": 32, "lr": 1e-2, "train_limit": 2000, "test_limit": None}

    # ---------------------------------------------------------------- model and data
    def load_train(self, config: TrainConfig):
        return load_source(config, config.train_split)  # raw pairs: classes and kind size the model

    def model_info(self, train) -> dict[str, Any]:
        return {"classes": list(train.classes), "binary": bool(train.binary), "ignore_index": train.ignore_index}

    def build_model(self, config: TrainConfig, info: dict[str, Any]) -> nn.Module:
        from snella.segmentation.models import build_segmentation_model, is_plain_vit

        size = config.image_size or native_size(config.data)
        kwargs = dict(config.model_kwargs)
        vit = not config.model.startswith("hf:") and is_plain_vit(config.model)
        if vit:
            kwargs.setdefault("img_size", size)  # the ViT's position grid at the task's input size
        outputs = 1 if info["binary"] else len(info["classes"])
        spec = build_segmentation_model(config.model, outputs, config.decoder, config.pretrained, config.weights,
                                        **kwargs)
        model = spec.model
        stride = model.encoder.patch_embed.patch_size[0] if vit else 32
        if not config.model.startswith("hf:") and size % stride:
            raise ValueError(f"image_size={size} does not fit {config.model}: its side must be a multiple of "
                             f"{stride} ({'the patch size' if vit else 'the encoder stride'}); pass --image-size")
        model.input_size, model.input_mean, model.input_std = size, spec.mean, spec.std
        model.trained_in_full_names = list(spec.modules_to_save)
        return model

    def trained_in_full(self, config: TrainConfig, model: nn.Module) -> list[str]:
        return list(model.trained_in_full_names)  # the decoder / head: new, so it trains in full

    def datasets(self, config: TrainConfig, train, model: nn.Module) -> TaskData:
        size, mean, std = model.input_size, model.input_mean, model.input_std
        train_set = cached_split(config, config.train_split, size, mean, std, config.train_limit)
        test_set = cached_split(config, config.test_split, size, mean, std, config.test_limit)
        val_set = cached_split(config, config.val_split, size, mean, std, config.test_limit) \
            if config.val_split else None
        for other in (test_set, val_set):
            if other is not None and other.classes != train_set.classes:
                raise ValueError(f"{config.data}: split {other.split!r} has classes {other.classes[:10]}, the "
                                 f"training split {train_set.classes[:10]}; every split must have the same classes")
        self.loss = SegmentationLoss(train_set.binary, config.dice_weight, train_set.ignore_index)
        self.ignore_index = train_set.ignore_index
        info = {"input": {"transform": config.transform, "image_size": size, "mean": list(mean), "std": list(std),
                          "channels": 3}}
        return TaskData(train_set, test_set, val_set, info=info)

    # ---------------------------------------------------------------- training
    def augment(self, batch: tuple, config: TrainConfig, generator: torch.Generator) -> tuple:
        images, masks = batch
        return flip_crop(images, masks, generator) if config.transform == "flip-crop" else (images, masks)

    def training_step(self, forward, batch: tuple) -> StepOutput:
        images, masks = batch
        logits = forward(images).float()  # (B, C, H, W)
        loss = self.loss(logits, masks)
        valid = masks != self.ignore_index  # (B, H, W)
        correct = ((predictions(logits) == masks) & valid).flatten(1).sum(1)
        pixel_acc = (correct / valid.flatten(1).sum(1).clamp_min(1)).sum()  # per image, summed over the batch
        return StepOutput(loss, {"loss": loss.item() * len(masks), "pixel_acc": pixel_acc.item()}, len(masks))

    # ---------------------------------------------------------------- evaluation and reporting
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                 precision: str = "fp32", ctx: Optional[DistContext] = None) -> dict[str, Any]:
        """mIoU, mDice, pixel accuracy (and binary measures) over ``dataset``; each rank scores its share and the
        accumulators' states are summed, so every rank returns the same numbers."""
        rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        was_training = model.training
        model.eval()
        kind = dict(num_classes=len(dataset.classes), ignore_index=dataset.ignore_index, binary=dataset.binary)
        metrics = SegmentationMetrics(**kind)
        for images, masks in batches(dataset, shard(torch.arange(len(dataset)), rank, world, pad=False), batch_size):
            with autocast(device, precision):
                logits = model(images.to(device))  # (B, C, H, W)
            metrics.update(logits.float().cpu(), masks)
        state = metrics.state()
        if ctx is not None:
            state = all_reduce_sum(ctx, state.to(ctx.device)).cpu()
        model.train(was_training)
        result = SegmentationMetrics.from_state(state, **kind).compute()
        for name in ("iou", "dice"):  # per class by name; a class absent from truth and prediction has none
            result[name] = {c: (None if v != v else v) for c, v in zip(dataset.classes, result[name])}
        return {**result, "images": len(dataset)}  # the ranks' shares together

    def val_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"val_miou": metrics["miou"]}

    def show(self, key: str, value: float) -> str:
        if key == "train_loss":
            return f"loss {value:.4f}"
        labels = {"train_pixel_acc": "pixel acc", "val_miou": "val mIoU"}
        return f"{labels.get(key, key)} {100 * value:.2f}%"

    def summary_lines(self, metrics: dict[str, Any]) -> list[str]:
        lines = [f"  test mIoU         {100 * metrics['test_miou']:.2f}%  ({metrics['test_split']} split, "
                 f"{metrics['test_images']} images)",
                 f"  test mDice        {100 * metrics['test_mdice']:.2f}%",
                 f"  test pixel acc    {100 * metrics['test_pixel_accuracy']:.2f}%"]
        for key, label in BINARY_MEASURES:
            if f"test_{key}" in metrics:
                lines.append(f"  test {label:<13}{metrics[f'test_{key}']:.4f}")
        return lines

    def write_pictures(self, out: Path, history: list[dict[str, Any]], model: nn.Module, data: TaskData,
                       device: torch.device, precision: str) -> list[Path]:
        from snella.plots import plot_curves
        from snella.segmentation.plots import plot_overlays

        written = [plot_curves(history, out / CURVES_PLOT, "train_pixel_acc", "val_miou", "pixel accuracy / mIoU",
                               ("train pixel accuracy", "val mIoU"))] if history else []
        test = data.test
        count = min(OVERLAY_IMAGES, len(test))
        logits = _logits(model, test.images[:count], device, precision)
        labels = predictions(logits)
        if test.binary:  # a binary prediction's foreground is label 1, as in the masks
            labels = labels.clamp_max(1)
        return written + [plot_overlays(test.unnormalised(count).numpy(), test.labels[:count].numpy(),
                                        labels.numpy(), out / OVERLAYS_PLOT, test.classes, test.ignore_index)]

    # ---------------------------------------------------------------- the run tools
    def evaluate_run(self, run: Run, data: Optional[str], split: str, batch_size: int, precision: str,
                     limit: Optional[int]) -> dict[str, Any]:
        import dataclasses

        source = data or run.config.data
        config = dataclasses.replace(run.config, data=source)
        spec = run.info["input"]
        dataset = cached_split(config, split, spec["image_size"], spec["mean"], spec["std"], limit)
        if dataset.classes != run.classes or dataset.binary != run.info["binary"]:
            raise ValueError(f"{source} has classes {dataset.classes[:10]} (binary: {dataset.binary}), the run in "
                             f"{run.directory} was trained on {run.classes[:10]} (binary: {run.info['binary']})")
        result = self.evaluate(run.model, dataset, batch_size, run.device, precision)
        return {**result, "data": source, "split": split, "run": str(run.directory)}

    writes_predictions = True

    def predict(self, run: Run, files: list[Path], top_k: int, batch_size: int,
                precision: str, output_dir: Optional[Path] = None) -> list[dict[str, Any]]:
        """A mask PNG per image in ``output_dir`` (default ``<run>/predictions/``; the image's size: label
        indices, binary 0/255)."""
        spec, binary = run.info["input"], run.info["binary"]
        folder = Path(output_dir) if output_dir is not None else run.directory / PREDICTIONS_DIR
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"output_dir={str(folder)!r} is a file; accepted: a folder (created if missing)")
        folder.mkdir(parents=True, exist_ok=True)
        mean, std = torch.tensor(spec["mean"]).view(-1, 1, 1), torch.tensor(spec["std"]).view(-1, 1, 1)
        results, used = [], set()
        for path in files:
            image = open_image(str(path), "RGB")
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
            size = (spec["image_size"], spec["image_size"])
            x = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            logits = _logits(run.model, ((x - mean) / std)[None], run.device, precision)  # (1, C, h, w)
            logits = F.interpolate(logits, size=pixels.shape[1:], mode="bilinear", align_corners=False)
            labels = predictions(logits)[0].numpy().astype(np.uint8)  # (H, W), the image's own size
            name = path.stem if path.stem not in used else f"{path.stem}-{len(used)}"
            used.add(name)
            mask_path = folder / f"{name}.png"
            Image.fromarray(labels * 255 if binary else labels).save(mask_path)
            counts = np.bincount(labels.ravel(), minlength=len(run.classes)) / labels.size
            results.append({"file": str(path), "mask": str(mask_path),
                            "fractions": {c: float(f) for c, f in zip(run.classes, counts) if f > 0}})
        return results

    def export(self, run: Run, output: Path) -> dict[str, Any]:
        from snella.segmentation.export import write_segmenter

        size = run.info["input"]["image_size"]
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (2, 3, H, W)
        with torch.no_grad():
            tuned = run.model.eval()(example)  # before merging: a merge may fold the adapter in place
        info = write_segmenter(merged_model(run), tuned, run.config, output, example,
                               {"classes": run.classes, "binary": run.info["binary"], "input": run.info["input"],
                                "run": str(run.directory)})
        return {**info, "json": str(output.with_suffix(".json")), "output": str(output)}


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """Float logits ``(B, C, H, W)`` on the CPU of ``model`` in eval mode (its mode restored after)."""
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        out = model(images.to(device)).float().cpu()
    model.train(was_training)
    return out
