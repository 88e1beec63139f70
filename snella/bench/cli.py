"""`snella bench memory|speed|accuracy`: the benchmark subcommands, one typed function each, and their arguments.

Registered in snella/cli.py's COMMANDS as ``"bench": (BENCH_HELP, add_bench_arguments, run_bench)``.
Importing this module is cheap: torch and timm load only when a benchmark runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Optional, Sequence

BENCH_HELP = ("Benchmarks: peak memory and step time per method (memory, speed), accuracy on a VTAB-style suite, "
              "SNELLA's recipe choices on its val split (recipes), segmentation (segmentation).")
DEFAULT_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224")


def memory(models: Sequence[str] = DEFAULT_MODELS, batches: Sequence[int] = (8,), methods: Optional[Sequence[str]] = None,
           steps: int = 3, output_dir: str = "bench/results", rank: int = 32, sparsity: float = 0.8,
           image_size: int = 224, device: str = "cpu", timeout: Optional[float] = None,
           keep_going: bool = False) -> list[dict]:
    """Peak training memory of every method, each in its own process (its step times are kept, not reported)."""
    from snella.bench.memory_speed import run_suite
    from snella.bench.worker import METHODS

    return run_suite(models=models, batches=batches, methods=methods or METHODS, output_dir=output_dir, steps=steps,
                     rank=rank, sparsity=sparsity, image_size=image_size, device=device, harness="memory",
                     repeats=1, timeout=timeout, keep_going=keep_going)


def speed(models: Sequence[str] = DEFAULT_MODELS, batches: Sequence[int] = (8,), methods: Optional[Sequence[str]] = None,
          steps: int = 3, output_dir: str = "bench/results", rank: int = 32, sparsity: float = 0.8,
          image_size: int = 224, device: str = "cpu", repeats: int = 3, timeout: Optional[float] = None,
          keep_going: bool = False) -> list[dict]:
    """Training-step time of every method, each in its own process with the default allocator, in interleaved rounds."""
    from snella.bench.memory_speed import run_suite
    from snella.bench.worker import METHODS

    return run_suite(models=models, batches=batches, methods=methods or METHODS, output_dir=output_dir, steps=steps,
                     rank=rank, sparsity=sparsity, image_size=image_size, device=device, harness="speed",
                     repeats=repeats, timeout=timeout, keep_going=keep_going)


def accuracy(quick: bool = False, tasks: Optional[Sequence[str]] = None, backbones: Optional[Sequence[str]] = None,
             methods: Optional[Sequence[str]] = None, epochs: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
             workers: int = 2, output_dir: str = "bench/results", command: str = "", train_size: Optional[int] = None,
             val_size: Optional[int] = None, test_size: Optional[int] = None) -> dict[str, Any]:
    """Test accuracy of every method on the VTAB-style suite (lr chosen on val, 3 seeds), every backbone."""
    from snella.bench.accuracy import SuiteConfig, quick_config, run_suite

    overrides = {k: v for k, v in dict(tasks=tasks, backbones=backbones, methods=methods, epochs=epochs,
                                       seeds=tuple(seeds) if seeds else None, train_size=train_size,
                                       val_size=val_size, test_size=test_size).items() if v is not None}
    overrides.update(workers=workers, output_dir=output_dir)
    config = quick_config(**overrides) if quick else SuiteConfig(**overrides)
    return run_suite(config, command=command)


def recipes(variants: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None,
            backbones: Optional[Sequence[str]] = None, seeds: Sequence[int] = (0, 1), suite_json: Optional[str] = None,
            epochs: Optional[int] = None, workers: int = 2, output_dir: str = "bench/results", command: str = "",
            train_size: Optional[int] = None, val_size: Optional[int] = None) -> dict[str, Any]:
    """SNELLA-32's recipe choices (layer score, reallocation schedule, initial sparsity, EMA, BatchNorm
    statistics) compared on the suite's val split, at the lr a full suite chose."""
    from pathlib import Path

    from snella.bench.accuracy import SuiteConfig
    from snella.bench.recipes import VARIANTS, run_recipes

    overrides = {k: v for k, v in dict(tasks=tasks, backbones=backbones, epochs=epochs, train_size=train_size,
                                       val_size=val_size).items() if v is not None}
    config = SuiteConfig(**overrides, workers=workers, output_dir=output_dir)
    return run_recipes(config, list(variants or VARIANTS), list(seeds), Path(suite_json) if suite_json else None,
                       command=command)


def segmentation(quick: bool = False, benchmarks: Optional[Sequence[str]] = None,
                 methods: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
                 epochs: Optional[int] = None, train_limit: Optional[int] = None, test_limit: Optional[int] = None,
                 workers: int = 2, output_dir: str = "bench/results", command: str = "") -> dict[str, Any]:
    """Test mIoU / mDice of linear, full, LoRA-8, SNELL-8 and SNELLA-32 on the Fashion-MNIST composites (project
    ViT) and the liver CT slices (EfficientNet-Lite0 + FPN): lr chosen on val, 3 seeds, with parameters, adapter
    size, peak memory and time."""
    from snella.bench.segmentation import SegBenchConfig, quick_config, run_benchmark

    overrides = {k: v for k, v in dict(benchmarks=benchmarks, methods=methods, seeds=tuple(seeds) if seeds else None,
                                       epochs=epochs, train_limit=train_limit, test_limit=test_limit).items()
                 if v is not None}
    overrides.update(workers=workers, output_dir=output_dir)
    config = quick_config(**overrides) if quick else SegBenchConfig(**overrides)
    return run_benchmark(config, command=command)


# ---------------------------------------------------------------- arguments


def _add_memory_speed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                        help=f"timm model names (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batches", nargs="+", type=int, default=[8], metavar="N", help="batch sizes (default: 8)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help="methods of snella.bench.worker.METHODS (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per run (default: 3)")
    parser.add_argument("--rank", type=int, default=32, help="rank of SNELL/SNELLA; LoRA's is in its name (default: 32)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="sparsity of SNELL/SNELLA (default: 0.8)")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels (default: 224)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--output-dir", default="bench/results",
                        help="where the CSV, tables and chart go (default: bench/results)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one method's worker may take (default: none)")
    parser.add_argument("--keep-going", action="store_true",
                        help="leave out a method whose worker fails or times out, and measure the rest")


def _add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    _add_memory_speed_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds over the methods; a method's time is its median round (default: 3)")


def _add_accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    from snella.bench.accuracy import BACKBONES, METHODS
    from snella.bench.tasks import TASKS

    parser.add_argument("--quick", action="store_true", help="a reduced suite (2 tasks, small splits, 2 epochs, "
                        "2 seeds) that runs in a few minutes")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), metavar="TASK",
                        help=f"tasks to run (default: all: {', '.join(TASKS)})")
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), metavar="NAME",
                        help=f"backbones (default: all: {', '.join(BACKBONES)})")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="NAME",
                        help=f"methods (default: all: {', '.join(METHODS)})")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: 5; --quick: 2)")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds of the final runs (default: 0 1 2; --quick: 0 1)")
    for split, default in (("train", "800; faces 100; --quick 200"), ("val", "200; faces 20; --quick 50"),
                           ("test", "the natural tasks' whole test part, structured 1,000; --quick 300")):
        parser.add_argument(f"--{split}-size", type=int, metavar="N",
                            help=f"images in each task's {split} split (default: {default}); smaller for a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="runs trained in parallel, one process (and one "
                        "thread) each (default: 2)")
    parser.add_argument("--output-dir", default="bench/results",
                        help="where the CSV, markdown and JSON go (default: bench/results)")


def _add_recipes_arguments(parser: argparse.ArgumentParser) -> None:
    from snella.bench.accuracy import BACKBONES
    from snella.bench.recipes import VARIANTS
    from snella.bench.tasks import TASKS

    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                        help="recipes to compare (default: all: " + "; ".join(f"{k}: {v.about}" for k, v in
                                                                               VARIANTS.items()) + ")")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), metavar="TASK", help="tasks (default: all)")
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONES), metavar="NAME",
                        help="backbones (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default: 0 1)")
    parser.add_argument("--suite-json", metavar="FILE", help="a full `snella bench accuracy` JSON whose SNELLA-32 "
                        "learning rates are used (default: the middle of SNELLA-32's grid)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the suite's, 5)")
    for split in ("train", "val"):
        parser.add_argument(f"--{split}-size", type=int, metavar="N", help=f"images in each task's {split} split "
                            "(default: the suite's); smaller for a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="runs trained in parallel (default: 2)")
    parser.add_argument("--output-dir", default="bench/results", help="where the CSV, markdown and JSON go "
                        "(default: bench/results)")


def _add_segmentation_arguments(parser: argparse.ArgumentParser) -> None:
    from snella.bench.segmentation import BENCHMARKS, METHODS

    parser.add_argument("--quick", action="store_true", help="small splits, 2 epochs, 2 seeds: a few minutes")
    parser.add_argument("--benchmarks", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"data sets (default: all: {', '.join(BENCHMARKS)})")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="NAME",
                        help=f"methods (default: all: {', '.join(METHODS)})")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds of the final runs (default: 0 1 2; --quick: 0 1)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: each benchmark's own)")
    parser.add_argument("--train-limit", type=int, metavar="N", help="training images per run (default: each "
                        "benchmark's own)")
    parser.add_argument("--test-limit", type=int, metavar="N", help="images scored per run (default: each "
                        "benchmark's own)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one process and one thread each "
                        "(default: 2)")
    parser.add_argument("--output-dir", default="bench/results", help="where the CSV, markdown and JSON go "
                        "(default: bench/results)")


BENCH_COMMANDS = {
    "memory": (memory.__doc__, _add_memory_speed_arguments),
    "speed": (speed.__doc__, _add_speed_arguments),
    "accuracy": (accuracy.__doc__, _add_accuracy_arguments),
    "recipes": (recipes.__doc__, _add_recipes_arguments),
    "segmentation": (segmentation.__doc__, _add_segmentation_arguments),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Give the `bench` parser its subcommands (memory, speed, accuracy) and their arguments."""
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", title="benchmarks", required=True)
    for name, (help_text, add_arguments) in BENCH_COMMANDS.items():
        child = sub.add_parser(name, help=(help_text or "").strip().splitlines()[0], description=help_text)
        add_arguments(child)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark ``args.bench_command`` with the parsed arguments; returns the exit status."""
    if args.bench_command in ("memory", "speed"):
        common = (args.models, args.batches, args.methods, args.steps, args.output_dir, args.rank, args.sparsity,
                  args.image_size, args.device)
        if args.bench_command == "memory":
            memory(*common, timeout=args.timeout, keep_going=args.keep_going)
        else:
            speed(*common, repeats=args.repeats, timeout=args.timeout, keep_going=args.keep_going)
        return 0
    argv = sys.argv[1:]
    argv = argv[1:] if argv[:1] == ["bench"] else argv  # the same line from `snella bench` or `python -m`
    if args.bench_command == "segmentation":
        result = segmentation(args.quick, args.benchmarks, args.methods, args.seeds, args.epochs, args.train_limit,
                              args.test_limit, args.workers, args.output_dir, command="snella bench " + shlex.join(argv))
        print(result["files"][1].read_text())
        return 0
    if args.bench_command == "recipes":
        result = recipes(args.variants, args.tasks, args.backbones, args.seeds, args.suite_json, args.epochs,
                         args.workers, args.output_dir, command="snella bench " + shlex.join(argv),
                         train_size=args.train_size, val_size=args.val_size)
        print(result["files"][1].read_text())
        return 0
    result = accuracy(args.quick, args.tasks, args.backbones, args.methods, args.epochs, args.seeds, args.workers,
                      args.output_dir, command="snella bench " + shlex.join(argv), train_size=args.train_size,
                      val_size=args.val_size, test_size=args.test_size)
    print(result["files"][1].read_text())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m snella.bench.cli accuracy ...`: the bench commands without the main CLI."""
    parser = argparse.ArgumentParser(prog="snella bench", description=BENCH_HELP)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
