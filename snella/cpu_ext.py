"""The C++ competition passes (``csrc/fused_kernel.cpp``): built on first use, or None where they cannot be.

The extension is compiled on first use by ``torch.utils.cpp_extension.load`` (about half a minute; the
result is cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and rebuilt
when the source changes), with the ``ninja`` that the package installs. If there is no C++ compiler or the build fails,
``get()`` warns once and returns None, and ``kernel_vjp``/``functional`` run their torch passes instead:
the same values, more time per training step (``snella bench speed`` shows how much). ``SNELLA_CPU_EXTENSION=0`` turns the extension off;
``=1`` makes a failed build an error instead of a warning.

Threads: where torch runs its own loops on OpenMP (``torch.__config__.parallel_info()`` says "ATen
parallel backend: OpenMP", as pip's Linux wheels do), the extension is built with ``-fopenmp`` and
linked against the OpenMP runtime that torch has loaded (its ``libgomp`` in ``torch/lib``: the library
``omp_get_max_threads`` resolves to from libtorch_cpu), not the compiler's own: one runtime in the process, so ``torch.set_num_threads``
sets the extension's thread count too, and no second thread pool competes with torch's. If that
runtime cannot be found, or the OpenMP build fails (a compiler without OpenMP), the same source is
built without it and the passes run on one thread; ``SNELLA_CPU_OPENMP=0`` asks for that build.
Results are the same bit for bit either way, for any number of threads. ``build_info()`` says which
build is in use and why.
"""

from __future__ import annotations

import logging
import os
import re
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
# OpenMP runtimes by file name: GCC's libgomp (also as auditwheel's libgomp-<hash>.so.1), LLVM's libomp,
# Intel's libiomp5.
_OPENMP_RUNTIME = re.compile(r"lib(gomp|omp|iomp5)([-.][^/]*)?\.(so|dylib)(\.[0-9]+)*$")
_lock = threading.Lock()
_module: Any = None
_tried = False
_info: dict = {"variant": None, "runtime": None, "why_serial": None}


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


def _openmp_setting() -> bool:
    value = os.environ.get("SNELLA_CPU_OPENMP", "auto").strip().lower()
    if value not in ("auto", "0"):
        raise ValueError(f"SNELLA_CPU_OPENMP={value!r}: accepted values are 0 (one thread), auto")
    return value == "auto"


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (real paths; Linux only, else empty)."""
    try:
        with open("/proc/self/maps") as maps:
            names = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted({os.path.realpath(n) for n in names if _OPENMP_RUNTIME.match(os.path.basename(n))})


def _library_of(address: int) -> Optional[str]:
    """The shared library holding ``address`` (dladdr), or None."""
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    for name in (None, "libdl.so.2"):  # glibc >= 2.34 and macOS have dladdr in libc, older glibc in libdl
        try:
            dladdr = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError):
            continue
        dladdr.argtypes, dladdr.restype = [ctypes.c_void_p, ctypes.POINTER(DlInfo)], ctypes.c_int
        info = DlInfo()
        if dladdr(address, ctypes.byref(info)) and info.dli_fname:
            return os.path.realpath(os.fsdecode(info.dli_fname))
    return None


def _torch_openmp_runtime() -> tuple[Optional[str], str]:
    """(path of the OpenMP runtime torch uses, "") or (None, why the extension gets no OpenMP build).

    The runtime is the library that ``omp_get_max_threads`` resolves to from libtorch_cpu (its own
    dependency, whatever other OpenMP runtimes the process has loaded); failing that, the one OpenMP
    runtime mapped into the process."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None, "torch's parallel backend is not OpenMP"
    import ctypes
    import glob

    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*")):
        try:
            address = ctypes.cast(ctypes.CDLL(path).omp_get_max_threads, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        runtime = _library_of(address) if address else None
        if runtime is not None:
            return runtime, ""
    runtimes = openmp_runtimes()
    if len(runtimes) != 1:
        return None, f"torch's OpenMP runtime not identified (mapped: {runtimes or 'none found'})"
    return runtimes[0], ""


def _build(openmp_runtime: Optional[str]) -> Any:
    """Compile (or load from the cache) the extension: with OpenMP, linked to ``openmp_runtime``, or without."""
    # Importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not news here.
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_logger.setLevel(level)

    _ninja_on_path()
    if openmp_runtime is None:
        return load(name="snella_fused_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS, verbose=False)
    # -fopenmp compiles the OpenMP regions; the link names torch's runtime file instead of -fopenmp's
    # -lgomp (the compiler's libgomp: a second runtime where torch's has another soname, as in
    # auditwheel's libgomp-<hash>.so.1). The rpath lets the library resolve it on its own too (ldd).
    return load(name="snella_fused_cpu_omp", sources=[str(_SOURCE)], extra_cflags=_FLAGS + ["-fopenmp"],
                extra_ldflags=[openmp_runtime, "-Wl,-rpath," + os.path.dirname(openmp_runtime)], verbose=False)


def get() -> Optional[Any]:
    """The compiled module (``kth_abs``, ``apply_multiplier``, ``competition_grad``, ``parallel_info``), or None."""
    global _module, _tried, _info
    setting = _setting()
    if setting == "0":
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            runtime, why = _torch_openmp_runtime() if _openmp_setting() else (None, "SNELLA_CPU_OPENMP=0")
            _module = None
            if runtime is not None:
                try:
                    _module = _build(runtime)
                    _info = {"variant": "openmp", "runtime": runtime, "why_serial": None}
                except Exception as error:  # e.g. a compiler without OpenMP: build the one-thread passes
                    why = f"the OpenMP build failed ({type(error).__name__}: {_last_line(error)})"
                    logging.getLogger(__name__).info("snella: %s; building the one-thread C++ passes", why)
            if _module is None:
                try:
                    _module = _build(None)
                    _info = {"variant": "serial", "runtime": None, "why_serial": why}
                except Exception as error:  # no compiler, no ninja, a build error: fall back to eager torch
                    _info = {"variant": None, "runtime": None, "why_serial": None}
                    if setting == "1":
                        raise RuntimeError(f"building the C++ competition passes {_SOURCE} failed: {error}") from error
                    warnings.warn(f"snella: the C++ competition passes could not be built ({type(error).__name__}: "
                                  f"{_last_line(error)}); using the torch passes (same results, slower). Set "
                                  "SNELLA_CPU_EXTENSION=0 to skip the build.", RuntimeWarning, stacklevel=2)
            _tried = True
    return _module


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else ""


def build_info() -> dict:
    """Which build of the passes is in use (building it if needed): ``variant`` "openmp" (torch's
    threads), "serial" (one thread; ``why_serial`` says why) or None (no build: the torch passes), and
    ``runtime``, the OpenMP library it is linked to."""
    get()
    return dict(_info)


def module_for(t: torch.Tensor) -> Optional[Any]:
    """The compiled module if its passes apply to a tensor like ``t`` (CPU, float32 or float64), else None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    return get()


def usable(t: torch.Tensor) -> bool:
    """Whether the C++ passes apply to a tensor like ``t``."""
    return module_for(t) is not None
