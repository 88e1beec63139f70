"""Sparse fine-tuning of diffusion models: diffusers denoisers, the noise-prediction objective, sampling, scoring."""
