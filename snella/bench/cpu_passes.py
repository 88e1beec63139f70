"""Time the C++ competition passes (snella/csrc/fused_kernel.cpp) on 1 and on 2 torch threads.

    python -m snella.bench.cpu_passes [--repeats 20] [--threads 1 2]

Cases: ``kth_abs`` (the exact selection, at 80% sparsity) on ViT-B's matrix shapes (768x768 attention
projections, 2304x768 fused qkv, 3072x768 MLP), and ``apply_multiplier`` (with W0) and
``competition_grad`` (with the update) on 3072x768, float32. Each call is timed alone (its input is
restored outside the timed region); the thread counts alternate within every repeat, so load from
other processes falls on all of them alike. Prints the median per case and thread count and its ratio
to the first thread count, then the same for the best repeat (on a loaded machine a parallel region
waits for its last thread to be scheduled, which the median shows and the best mostly escapes), which
build is in use, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Sequence

import torch

from snella import cpu_ext


def _cases(ext) -> list[tuple[str, Callable[[], None], Callable[[], None]]]:
    """(name, reset, call): ``reset`` restores the inputs (untimed), ``call`` is timed."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for rows in (768, 2304, 3072):
        x = torch.randn(rows, 768, generator=g).view(-1)
        k = round(0.8 * x.numel())
        cases.append((f"kth_abs {rows}x768", lambda: None, lambda x=x, k=k: ext.kth_abs(x, k)))
    n = 3072 * 768
    kp0, grad0, base = (torch.randn(1, n, generator=g) for _ in range(3))
    level = ext.kth_abs(kp0.view(-1), round(0.8 * n))
    out, kp, grad = kp0.clone(), kp0.clone(), grad0.clone()

    def reset_out():
        out.copy_(kp0)

    def reset_grad():
        kp.copy_(kp0)
        grad.copy_(grad0)

    cases.append(("apply_multiplier 3072x768", reset_out,
                  lambda: ext.apply_multiplier(out, base, [level], [True], True)))
    cases.append(("competition_grad 3072x768", reset_grad,
                  lambda: ext.competition_grad(kp, grad, [level], [True], True, True)))
    return cases


def measure(threads: Sequence[int] = (1, 2), repeats: int = 20) -> dict[str, dict[int, list[float]]]:
    """Seconds of every repeat, per case and thread count."""
    ext = cpu_ext.get()
    if ext is None:
        raise SystemExit("the C++ passes did not build here (see the warning): nothing to time")
    old = torch.get_num_threads()
    times: dict[str, dict[int, list[float]]] = {}
    try:
        cases = _cases(ext)
        for name, reset, call in cases:  # warm-up: page in the inputs, start the thread pool
            for t in threads:
                torch.set_num_threads(t)
                reset()
                call()
        for _ in range(repeats):
            for name, reset, call in cases:
                for t in threads:
                    torch.set_num_threads(t)
                    reset()
                    start = time.perf_counter()
                    call()
                    times.setdefault(name, {}).setdefault(t, []).append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return times


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    result = measure(args.threads, args.repeats)
    load_after = os.getloadavg()
    info = cpu_ext.build_info()
    print(f"build: {info['variant']}" + (f" ({info['why_serial']})" if info["why_serial"] else "")
          + f"; torch {torch.__version__}; {os.cpu_count()} CPUs; median of {args.repeats}")
    first = args.threads[0]
    header = ["pass (float32)"]
    for stat in ("median", "best"):
        header += [f"{stat} {t} thr (ms)" for t in args.threads] + [f"{first}/{t}" for t in args.threads[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, per in result.items():
        cells = [name]
        for stat in (statistics.median, min):
            value = {t: stat(per[t]) for t in args.threads}
            cells += [f"{value[t] * 1e3:.2f}" for t in args.threads]
            cells += [f"{value[first] / value[t]:.2f}x" for t in args.threads[1:]]
        print("| " + " | ".join(cells) + " |")
    print("load average (1, 5, 15 min) before: " + ", ".join(f"{v:.2f}" for v in load_before)
          + "; after: " + ", ".join(f"{v:.2f}" for v in load_after))


if __name__ == "__main__":
    main()
