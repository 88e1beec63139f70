"""Which tensors the Triton passes (``snella/gpu/``) take: the dispatch rule and its ``SNELLA_TRITON`` switch.

The kernel + competition passes of ``kernel_vjp`` run in Triton (``gpu/kernel.py``, ``gpu/select.py``)
for float32 tensors on CUDA when triton imports, and in torch otherwise (the same values to float
rounding, the same masks by construction of each path). ``SNELLA_TRITON``:

- ``auto`` (default): Triton on CUDA when it imports, torch elsewhere;
- ``0``: always the torch path (the reference, and the way out if a Triton build misbehaves);
- ``1``: Triton required on CUDA (an error if it does not import); with ``TRITON_INTERPRET=1`` it also
  takes CPU tensors, through triton's interpreter: that is how the tests run the Triton code without a GPU.

Nothing here imports triton until a tensor asks for it, so ``import snella`` stays cheap and the
interpreter switch (read by triton when a kernel is defined) can still be set by the tests.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

SETTINGS = ("auto", "0", "1")


def setting() -> str:
    """The value of ``SNELLA_TRITON`` (read on every call, so tests can switch it)."""
    value = os.environ.get("SNELLA_TRITON", "auto").strip().lower()
    if value not in SETTINGS:
        raise ValueError(f"SNELLA_TRITON={value!r}: accepted values are auto, 0 (torch path), 1 (Triton required)")
    return value


def interpreting() -> bool:
    """Whether triton's interpreter is asked for (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    """Whether triton is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def wanted(t: torch.Tensor) -> bool:
    """Whether the passes over tensors like ``t`` (a factor or an update) run in Triton.

    Float32 only: the layers bring bf16/fp16 factors up to float32 before the kernel (``ops._up``), and
    float64 stays on the torch path (the reference precision of the tests).
    """
    mode = setting()
    if mode == "0" or t.dtype != torch.float32:
        return False
    if t.device.type == "cuda":
        if triton_importable():
            return True
        if mode == "1":
            raise RuntimeError("SNELLA_TRITON=1 but triton is not installed; pip install triton, or set "
                               "SNELLA_TRITON=0 for the torch path")
        return False
    return t.device.type == "cpu" and mode == "1" and interpreting() and triton_importable()
