"""One benchmark measurement, run in a process of its own: build a model with one method, train a few
steps with AdamW, report the peak memory and the step time.

Memory on CPU: the parent starts this process with ``MALLOC_MMAP_THRESHOLD_=65536``, so every large
tensor is its own mmap and freeing it returns the pages at once; resident memory then follows the
live tensors, and the peak resident set (``VmHWM``) minus the resident set after imports is what the
run allocated (weights, gradients, optimizer state, activations, transients). On CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional

import torch

METHODS = ("full", "linear", "lora-8", "lora-32", "gps-style", "snell-reference", "snell-fused", "snell-parallel",
           "snella-fused", "snella-parallel")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(method: str, model_name: str, num_classes: int, rank: int, sparsity: float,
          model_kwargs: Optional[dict] = None):
    """The model with ``method`` applied, and a per-step hook (the allocator's update for SNELLA)."""
    import snella.backbones  # noqa: F401 - registers the project's architectures
    import timm

    from snella.bench.baselines import apply_gps_style, apply_snell_reference
    from snella.training.config import TrainConfig
    from snella.training.methods import get_method

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
    after_step = None
    if method == "gps-style":
        apply_gps_style(model, density=1 - sparsity)
        model.get_submodule("head").requires_grad_(True)
        return model, after_step
    if method == "snell-reference":
        apply_snell_reference(model, r=32, sparsity=sparsity)
        model.get_submodule("head").requires_grad_(True)
        return model, after_step
    base, _, variant = method.partition("-")
    if base == "lora":
        config = TrainConfig(method="lora", r=int(variant), progress=False)
        return get_method("lora").apply(config, model), after_step
    if base in ("full", "linear"):
        return get_method(base).apply(TrainConfig(method=base, progress=False), model), after_step
    parallel = variant == "parallel"
    config = TrainConfig(method=base, r=rank, sparsity=sparsity, progress=False,
                         adapter_dropout=0.1 if parallel else 0.0, adapter_drop_path=0.1 if parallel else 0.0)
    wrapped = get_method(base).apply(config, model)
    if base == "snella":
        from snella.allocator import AllocatorConfig, BudgetAllocator

        # Every matrix at the target level: the timed steps then do the selection the end of training does.
        allocator = BudgetAllocator(wrapped.matrices(), AllocatorConfig(target_sparsity=sparsity, init_sparsity=sparsity),
                                    total_steps=1000, steps_per_epoch=1000)
        after_step = allocator.update_scores
    return wrapped, after_step


def measure(method: str, model_name: str, batch: int, steps: int = 3, warmup: int = 1, rank: int = 32,
            sparsity: float = 0.8, image_size: int = 224, num_classes: int = 100, device: str = "cpu",
            ballast_mb: int = 0, model_kwargs: Optional[dict] = None) -> dict:
    """Train ``warmup + steps`` AdamW steps and return peak memory (MB) and the median step time (s)."""
    if method not in METHODS:
        raise ValueError(f"unknown benchmark method {method!r}; accepted: {', '.join(METHODS)}")
    dev = torch.device(device)
    # Import everything any method uses before the baseline, so every method's figure starts equal.
    import peft  # noqa: F401
    import timm  # noqa: F401

    import snella.bench.baselines  # noqa: F401
    import snella.training.methods  # noqa: F401
    from snella import cpu_ext

    if dev.type == "cpu":  # the C++ competition passes (a small shared library), loaded for every method alike;
        cpu_ext.get()  # on CUDA they are never used, and building them would cost each worker a compile
    baseline_kb = _status_kb("VmRSS")
    model, after_step = build(method, model_name, num_classes, rank, sparsity, model_kwargs)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.999))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(dev)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(dev)
    # Known extra memory for the harness's own sanity test: must show up in the peak.
    ballast = torch.ones(ballast_mb * 2 ** 18, device=dev) if ballast_mb else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for step in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak_mb = ((_status_kb("VmHWM") - baseline_kb) / 1024 if dev.type == "cpu"
               else torch.cuda.max_memory_allocated(dev) / 2 ** 20)
    del ballast
    return {
        "method": method, "model": model_name, "batch": batch, "image_size": image_size, "rank": rank,
        "sparsity": sparsity, "device": str(dev), "peak_memory_mb": round(peak_mb, 1),
        "step_seconds": round(statistics.median(times), 4), "steps": steps,
        "trainable_params": sum(p.numel() for p in params), "loss": round(float(loss), 4),
        "threads": torch.get_num_threads(),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ballast-mb", type=int, default=0)
    parser.add_argument("--model-kwargs", default="{}", help="JSON dict of extra timm.create_model arguments")
    parser.add_argument("--json", required=True, help="where to write the result")
    args = parser.parse_args(argv)
    row = measure(args.method, args.model, args.batch, args.steps, args.warmup, args.rank, args.sparsity,
                  args.image_size, device=args.device, ballast_mb=args.ballast_mb,
                  model_kwargs=json.loads(args.model_kwargs))
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
