"""Seeded few-step sampling of a trained denoiser (DDIM or DPM-Solver++) from its training schedule."""

from __future__ import annotations

from typing import Callable

import torch

SAMPLERS = ("ddim", "dpm")


def inference_scheduler(train_scheduler, sampler: str):
    """The few-step scheduler ``sampler`` names, built from the training scheduler's config (same betas, same
    prediction type)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is invalid; accepted: {', '.join(SAMPLERS)}")
    kind = DDIMScheduler if sampler == "ddim" else DPMSolverMultistepScheduler
    return kind.from_config(train_scheduler.config)


def initial_noise(count: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """The starting noise of ``count`` samples, (count, C, H, W), drawn on the CPU from ``seed``: sample i starts
    from the same noise on any device and any number of processes."""
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], train_scheduler,
           noise: torch.Tensor, labels: torch.Tensor, steps: int, sampler: str = "ddim",
           batch_size: int = 250) -> torch.Tensor:
    """Images from ``noise`` by ``steps`` deterministic denoising steps (DDIM with eta 0, or DPM-Solver++ 2M).

    Args:
        predict: ``predict(x_t, timesteps, labels)`` -> the model's prediction (under autocast as the caller likes).
        train_scheduler: the schedule the model was trained with.
        noise: (N, C, H, W) on the model's device (``initial_noise``).
        labels: (N,) class indices on the same device.
        steps: denoising steps (25 is a good few-step setting).
        batch_size: samples denoised together.

    Returns:
        (N, C, H, W) float32 in [-1, 1].
    """
    if steps < 1:
        raise ValueError(f"sampling steps={steps} is invalid; accepted: an integer >= 1")
    out = []
    for start in range(0, len(noise), batch_size):
        scheduler = inference_scheduler(train_scheduler, sampler)  # DPM-Solver keeps state: one per batch
        scheduler.set_timesteps(steps)
        x = noise[start:start + batch_size] * scheduler.init_noise_sigma  # (B, C, H, W)
        y = labels[start:start + batch_size]
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            prediction = predict(model_input, t.expand(len(x)).to(x.device), y).float()
            x = scheduler.step(prediction, t, x).prev_sample
        out.append(x.float().clamp(-1, 1))
    return torch.cat(out)
