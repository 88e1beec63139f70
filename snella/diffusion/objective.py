"""The denoising objective of DDPM training: noisy inputs and the target the model predicts, from a diffusers scheduler."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """What the model predicts, as its scheduler's config says; a ValueError for a kind training cannot target."""
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type={kind!r} is not supported; accepted: {', '.join(PREDICTION_TYPES)}")
    return kind


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Training timesteps, uniform over 0..T-1 as in DDPM: (batch,) int64 on ``device``."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def noisy_and_target(scheduler, clean: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process and the regression target of one batch.

    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (the scheduler's ``add_noise``); the target is
    ``eps`` (epsilon), ``sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (v_prediction, Salimans & Ho 2022) or
    ``x_0`` (sample), as ``scheduler.config.prediction_type`` says.

    Args:
        scheduler: a diffusers training scheduler (``DDPMScheduler``).
        clean: images or latents x_0, (B, C, H, W), in the model's range ([-1, 1] for pixels).
        noise: eps, same shape, standard normal.
        timesteps: (B,) int64 in 0..T-1.

    Returns:
        x_t (B, C, H, W) and the target (B, C, H, W), both in ``clean``'s dtype.
    """
    kind = prediction_type(scheduler)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(clean, noise, timesteps)
    return noisy, clean
