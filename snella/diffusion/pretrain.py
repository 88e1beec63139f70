"""Pretraining of the diffusion task's shipped networks: the class-conditional UNet on real Fashion-MNIST (the model
`snella finetune --task diffusion` adapts) and the MNIST classifier that scores samples.

    python -m snella.diffusion.pretrain unet         # ~15 min on 2 CPU cores -> snella/assets/unet_fmnist/
    python -m snella.diffusion.pretrain classifier   # ~1 min -> snella/assets/mnist_classifier.safetensors

Each writes a .json beside its weights with the recipe, the measured numbers, the time and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snella.diffusion.classifier import CLASSIFIER_FILE, DigitClassifier
from snella.diffusion.models import (EMBEDDED_DIR, FMNIST_SCHEDULER_CONFIG, FMNIST_UNET_CONFIG, build_embedded_unet,
                                     build_scheduler)
from snella.diffusion.objective import noisy_and_target, sample_timesteps
from snella.data.augment import random_shift
from snella.pretrain import param_groups, warmup_cosine

# The UNet's recipe: chosen to fit ~15 minutes of 2 CPU cores (0.45 s per step at batch 64).
UNET_STEPS = 2000
UNET_BATCH = 64
UNET_LR = 2e-3          # short schedule, small net: a high peak with warm-up and cosine decay
UNET_WARMUP = 100
UNET_EMA = 0.999        # the shipped weights are the EMA, as diffusion training does
GRAD_CLIP = 1.0
VAL_IMAGES = 1000       # Fashion-MNIST test images for the final denoising loss
# The classifier's recipe (mnist5k's 4,000 training digits).
CLASSIFIER_EPOCHS = 10
CLASSIFIER_BATCH = 64
CLASSIFIER_LR = 1e-3
CLASSIFIER_SHIFT = 2    # random translation of up to this many pixels (digits are not centred alike)


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 grey images (N, 28, 28) as float32 (N, 1, 28, 28) in [-1, 1], the range the denoisers model."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 127.5 - 1.0).unsqueeze(1)


@torch.no_grad()
def denoising_loss(net: nn.Module, scheduler, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                   batch_size: int = 250) -> float:
    """Mean noise-prediction MSE of ``net`` over ``images`` with noise and timesteps drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        noise = torch.randn(x.shape, generator=generator)
        t = sample_timesteps(len(x), scheduler.config.num_train_timesteps, generator)
        noisy, target = noisy_and_target(scheduler, x, noise, t)
        total += float(F.mse_loss(net(noisy, t, class_labels=y).sample, target, reduction="sum"))
    return total / images.numel()


def pretrain_unet(output: Path = EMBEDDED_DIR, steps: int = UNET_STEPS, batch_size: int = UNET_BATCH,
                  lr: float = UNET_LR, seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """Train the embedded UNet from scratch on Fashion-MNIST (DDPM, epsilon) and write a DDPMPipeline folder.

    Args:
        output: the pipeline folder (unet/, scheduler/, model_index.json, pretraining.json).
        steps: optimizer steps; batch_size: images per step; lr: AdamW peak.
        seed: of the init, the batches, the noise and the timesteps.
        limit: train on the first ``limit`` images only (tests).
    """
    from diffusers import DDPMPipeline

    from snella.data.builtin import fashion_mnist

    start = time.perf_counter()
    parts = fashion_mnist()
    train_x, train_y = to_unit_range(parts.train_images[:limit]), torch.from_numpy(np.array(parts.train_targets[:limit]))
    val_x = to_unit_range(parts.test_images[:VAL_IMAGES])
    val_y = torch.from_numpy(np.array(parts.test_targets[:VAL_IMAGES]))
    torch.manual_seed(seed)
    net, scheduler = build_embedded_unet(), build_scheduler()
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(net, 0.0), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, UNET_WARMUP, steps))
    generator = torch.Generator().manual_seed(seed)
    losses, window = [], []
    for step in range(steps):
        index = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        x, y = train_x[index], train_y[index].long()
        noise = torch.randn(x.shape, generator=generator)
        t = sample_timesteps(batch_size, scheduler.config.num_train_timesteps, generator)
        noisy, target = noisy_and_target(scheduler, x, noise, t)
        loss = F.mse_loss(net(noisy, t, class_labels=y).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        decay = min(UNET_EMA, (1 + step) / (10 + step))  # TensorFlow's warm-up of the average
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 1 - decay)
        window.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            print(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.0f}s", flush=True)
            window = []
    ema.eval()
    summary = {
        "architecture": "UNet2DModel", "config": FMNIST_UNET_CONFIG, "scheduler": FMNIST_SCHEDULER_CONFIG,
        "dataset": "fashion-mnist", "train_images": len(train_x),
        "val_denoising_loss": denoising_loss(ema, scheduler, val_x, val_y), "val_images": len(val_x),
        "loss_per_100_steps": losses, "parameters": sum(p.numel() for p in net.parameters()),
        "seconds": round(time.perf_counter() - start, 1),
        "recipe": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": UNET_WARMUP,
                   "ema_decay": UNET_EMA, "grad_clip": GRAD_CLIP, "seed": seed, "limit": limit},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python -m snella.diffusion.pretrain unet" + ("" if output == EMBEDDED_DIR else f" --output {output}"),
    }
    output = Path(output)
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(str(output))
    (output / "pretraining.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pretrain_classifier(output: Path = CLASSIFIER_FILE, epochs: int = CLASSIFIER_EPOCHS, seed: int = 0,
                        limit: int | None = None) -> dict[str, Any]:
    """Train the scoring classifier on mnist5k's training split and write its weights and a .json beside them."""
    from safetensors.torch import save_file

    from snella.data.builtin import mnist5k

    start = time.perf_counter()
    parts = mnist5k()
    train_x, train_y = to_unit_range(parts.train_images[:limit]), torch.from_numpy(np.array(parts.train_targets[:limit]))
    test_x, test_y = to_unit_range(parts.test_images), torch.from_numpy(np.array(parts.test_targets))
    torch.manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLASSIFIER_LR, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_x) / CLASSIFIER_BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, 0, steps))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order), CLASSIFIER_BATCH):
            index = order[i:i + CLASSIFIER_BATCH]
            x = random_shift(train_x[index], CLASSIFIER_SHIFT, generator)
            loss = F.cross_entropy(model(x), train_y[index].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(output))
    summary = {"architecture": "DigitClassifier", "dataset": "mnist5k", "train_images": len(train_x),
               "test_images": len(test_x), "test_accuracy": accuracy, "seconds": round(time.perf_counter() - start, 1),
               "recipe": {"epochs": epochs, "batch_size": CLASSIFIER_BATCH, "lr": CLASSIFIER_LR,
                          "shift": CLASSIFIER_SHIFT, "seed": seed, "limit": limit},
               "command": "python -m snella.diffusion.pretrain classifier"}
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"classifier: test accuracy {100 * accuracy:.2f}% on {len(test_x)} mnist5k test digits", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m snella.diffusion.pretrain", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("what", choices=("unet", "classifier"))
    cli.add_argument("--output", default=None, help="where to write (default: the shipped location)")
    cli.add_argument("--steps", type=int, default=UNET_STEPS, help="unet: optimizer steps")
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    args = cli.parse_args(argv)
    if args.what == "unet":
        summary = pretrain_unet(Path(args.output or EMBEDDED_DIR), steps=args.steps, seed=args.seed, limit=args.limit)
        print(f"unet: val denoising loss {summary['val_denoising_loss']:.4f}, {summary['seconds']:.0f}s")
    else:
        pretrain_classifier(Path(args.output or CLASSIFIER_FILE), seed=args.seed, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
