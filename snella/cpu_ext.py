"""The C++ competition passes (``csrc/fused_kernel.cpp``): built on first use, or None where they cannot be.

The extension is compiled on first use by ``torch.utils.cpp_extension.load`` (about half a minute; the
result is cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and rebuilt
when the source changes), with the ``ninja`` that the package installs. If there is no C++ compiler or the build fails,
``get()`` warns once and returns None, and ``kernel_vjp``/``functional`` run their torch passes instead:
the same values, more time per training step (``snella bench speed`` shows how much). ``SNELLA_CPU_EXTENSION=0`` turns the extension off;
``=1`` makes a failed build an error instead of a warning.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

_SOURCE = Path(__file__).with_name("csrc") / "fused_kernel.cpp"
# Portable flags (no -march=native): the loops are memory-bound, and a build cached in a home directory
# shared by machines of different CPUs must run on all of them. No FMA contraction: a*b + c rounds as
# torch's separate mul and add do.
_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp-simd"]
_lock = threading.Lock()
_module: Any = None
_tried = False


def _setting() -> str:
    value = os.environ.get("SNELLA_CPU_EXTENSION", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"SNELLA_CPU_EXTENSION={value!r}: accepted values are 0 (off), 1 (required), auto")
    return value


def _ninja_on_path() -> None:
    """Put the pip package's ninja on PATH: torch looks for it there, and a venv's bin/ may not be."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")


def get() -> Optional[Any]:
    """The compiled module (``kth_abs``, ``apply_multiplier``, ``competition_grad``), or None."""
    global _module, _tried
    setting = _setting()
    if setting == "0":
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                # Importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not news here.
                cpp_logger = logging.getLogger("torch.utils.cpp_extension")
                level = cpp_logger.level
                cpp_logger.setLevel(logging.ERROR)
                try:
                    from torch.utils.cpp_extension import load
                finally:
                    cpp_logger.setLevel(level)

                _ninja_on_path()
                _module = load(name="snella_fused_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS, verbose=False)
            except Exception as error:  # no compiler, no ninja, a build error: fall back to eager torch
                if setting == "1":
                    raise RuntimeError(f"building the C++ competition passes {_SOURCE} failed: {error}") from error
                warnings.warn(f"snella: the C++ competition passes could not be built ({type(error).__name__}: "
                              f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); using the "
                              "torch passes (same results, slower). Set SNELLA_CPU_EXTENSION=0 to "
                              "skip the build.", RuntimeWarning, stacklevel=2)
                _module = None
            _tried = True
    return _module


def module_for(t: torch.Tensor) -> Optional[Any]:
    """The compiled module if its passes apply to a tensor like ``t`` (CPU, float32 or float64), else None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    return get()


def usable(t: torch.Tensor) -> bool:
    """Whether the C++ passes apply to a tensor like ``t``."""
    return module_for(t) is not None
