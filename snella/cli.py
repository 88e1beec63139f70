"""The `snella` command (console script and `python -m snella`): one typed function per subcommand.

    snella finetune [--config FILE|NAME] [--FIELD VALUE ...]   fine-tune (defaults: SNELLA, snella-default on mnist5k)
    snella evaluate --run DIR [--data SRC] [--split test]        accuracy of a finished run
    snella predict --run DIR IMAGE_OR_FOLDER ... [--top-k 5]     top-k labels of images
    snella merge --run DIR --output FILE.safetensors             plain timm checkpoint, adapter folded in
    snella pretrain ...                                          pretrain the snella-default backbone
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snella import __version__
from snella.training.config import RUN_ONLY, TrainConfig, read_yaml, task_defaults
from snella.training.outputs import CONFIG_FILE

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1

# ---------------------------------------------------------------- the subcommands


def finetune(config: TrainConfig) -> dict[str, Any]:
    """Fine-tune a backbone on a dataset with one method; writes metrics, adapter, checkpoint and plots."""
    from snella.train import finetune as run_finetune  # torch, timm: imported only when a command runs

    return run_finetune(config)


def evaluate(run: str, data: Optional[str] = None, split: str = "test", batch_size: int = 256,
             precision: str = "fp32", device: str = "auto", limit: Optional[int] = None) -> dict[str, Any]:
    """Accuracy (segmentation: mIoU, mDice, pixel accuracy) of a finished run on a split (default: its data, test).

    Images go through the run's eval transform; with transform 'none' (the default run's), images of
    another size than the model's input are first resized to it (bicubic), as `snella predict` does.
    """
    from snella.training.tools import evaluate as run_evaluate

    return run_evaluate(run, data, split, batch_size, precision, device, limit)


def predict(run: str, images: list[str], top_k: int = 5, batch_size: int = 256, precision: str = "fp32",
            device: str = "auto", output_dir: Optional[str] = None) -> list[dict[str, Any]]:
    """Top-k labels, with probabilities, of image files or folders of images (segmentation runs: mask PNGs).

    A segmentation run writes one mask per image to --output-dir (default <run>/predictions/) as
    <image stem>.png, at the image's own size (class indices; binary masks as 0/255); --top-k does not apply
    there.

    Any image is brought to the run's input as the run's eval transform (saved in its run.json) does:
    converted to the run's channels (grey copied to RGB, RGB to grey luma, an alpha channel dropped),
    resized to the model's input size (transform 'none' and 'vtab': bicubic to image_size x image_size,
    aspect not kept; 'fgvc': the short side to image_size * 256/224, then the central square), scaled
    to [0, 1] and normalised with the run's mean and std. Images already at the input size are not resized.
    """
    from snella.training.tools import predict as run_predict

    return run_predict(run, images, top_k, batch_size, precision, device, output_dir)


def merge(run: str, output: str) -> dict[str, Any]:
    """Fold a run's adapter into its backbone; write a timm (hf: runs: transformers) checkpoint + JSON loadable without snella."""
    from snella.training.tools import merge as run_merge

    return run_merge(run, output)


# ---------------------------------------------------------------- arguments of each subcommand

# First field of each argument group of `snella finetune --help`.
_GROUPS = {"task": "task", "model": "model", "data": "data", "method": "method", "decoder": "segmentation",
           "epochs": "optimisation", "seed": "run", "debug_step_delay": "testing hooks"}


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (or a packaged config name: "
                        "lora, full, linear, snell, ...); flags given here override it")
    hints = typing.get_type_hints(TrainConfig)
    group = parser
    for f in fields(TrainConfig):
        if f.name in _GROUPS:
            group = parser.add_argument_group(_GROUPS[f.name])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        hint = hints[f.name]
        optional = typing.get_origin(hint) is typing.Union
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        # argparse.SUPPRESS: only flags actually given appear, so they override the YAML and nothing else
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(base) is list:
            group.add_argument(flag, nargs="+", metavar="NAME", default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = {int: "INT", float: "FLOAT", str: "STR"}.get(base, "MAP")
            group.add_argument(flag, metavar=metavar, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Dataclass defaults < the task's defaults < a resumed run's saved config < the --config YAML < flags."""
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    settings: dict[str, Any] = {}
    source = "command line"
    if flags.get("resume") and flags.get("output_dir"):
        saved = Path(flags["output_dir"]) / CONFIG_FILE
        if saved.is_file():  # resume with the run's own settings unless told otherwise
            settings.update({k: v for k, v in read_yaml(saved).items() if k not in RUN_ONLY})
    if args.config:
        settings.update(read_yaml(args.config))
        source = f"{args.config} + command line"
    task = flags.get("task", settings.get("task", "classification"))
    try:
        defaults = task_defaults(task)
    except ValueError:
        defaults = {}  # an unknown task: TrainConfig names it and the tasks accepted
    return TrainConfig.from_dict({**defaults, **settings, **flags}, source=source)


def _add_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="output folder of a finished `snella finetune`")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default) or bf16 (autocast)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_argument(parser)
    parser.add_argument("--data", default=None, help="dataset source (default: the run's own)")
    parser.add_argument("--split", default="test", help="train, val, trainval or test (default: test)")
    parser.add_argument("--limit", type=int, default=None, help="score only this many images (a fixed subset)")
    _add_common(parser)


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_argument(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    parser.add_argument("--top-k", type=int, default=5, help="labels shown per image (default: 5)")
    parser.add_argument("--output-dir", metavar="DIR", help="segmentation runs: the folder the mask PNGs go to "
                        "(created; default: <run>/predictions)")
    _add_common(parser)


def _add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_argument(parser)
    parser.add_argument("--output", required=True, metavar="FILE", help="the .safetensors file to write "
                        "(its architecture goes to the same name with .json)")


# ---------------------------------------------------------------- calling them and printing results


def _run_finetune(args: argparse.Namespace) -> None:
    try:
        finetune(config_from_args(args))  # the loop prints its own summary
    except ValueError as err:
        raise ValueError(cli_wording(str(err))) from err


# A module name list for --target-modules that fits each default family, for the message below.
_TARGET_EXAMPLES = ("e.g. --target-modules qkv proj fc1 fc2 (timm transformers), --target-modules conv1 conv2 "
                    "(ResNet), or full names such as blocks.0.attn.qkv")


def cli_wording(message: str) -> str:
    """A library error rewritten for the command line: ``SnellaConfig(target_modules=...)`` -> ``--target-modules``.

    The library names its Python arguments; here the user can only pass flags, so a message about
    the adapted modules says which flag to pass and gives examples.
    """
    if "target_modules" not in message:
        return message
    message = re.sub(r"SnellaConfig\(target_modules=[^)]*\)", "--target-modules NAME [NAME ...]", message)
    message = re.sub(r"target_modules=\[([^\]]*)\]",  # a list as Python prints it -> the flag as typed
                     lambda m: "--target-modules " + " ".join(re.findall(r"'([^']*)'", m.group(1))), message)
    message = re.sub(r"(?<!-)target_modules", "--target-modules", message)
    return f"{message.rstrip()} (pass module names or name suffixes to --target-modules, {_TARGET_EXAMPLES})"


def _run_evaluate(args: argparse.Namespace) -> None:
    result = evaluate(args.run, args.data, args.split, args.batch_size, args.precision, args.device, args.limit)
    scores = (f"accuracy {100 * result['accuracy']:.2f}%" if "accuracy" in result else  # segmentation:
              f"mIoU {100 * result['miou']:.2f}%, mDice {100 * result['mdice']:.2f}%, pixel accuracy "
              f"{100 * result['pixel_accuracy']:.2f}%")
    line = f"{scores} on {result['data']} [{result['split']}], {result['images']} images"
    print(json.dumps(result) if args.json else line)


def _run_predict(args: argparse.Namespace) -> None:
    results = predict(args.run, args.images, args.top_k, args.batch_size, args.precision, args.device,
                      args.output_dir)
    if args.json:
        print(json.dumps(results))
        return
    for item in results:
        if "mask" in item:  # segmentation: the mask file written and the share of each class in it
            shares = ", ".join(f"{c} {100 * f:.1f}%" for c, f in item["fractions"].items())
            print(f"{item['file']}: mask {item['mask']} ({shares})")
            continue
        print(f"{item['file']}: " + ", ".join(f"{t['label']} ({t['probability']:.3f})" for t in item["top"]))


def _run_merge(args: argparse.Namespace) -> None:
    info = merge(args.run, args.output)
    print(f"wrote {info['output']} and {info['json']} (architecture {info['architecture']}; tuned vs merged "
          f"logits differ by at most {info['max_abs_logit_diff']:.2e})")


def _run_pretrain(args: argparse.Namespace) -> Any:
    import snella.pretrain

    return snella.pretrain.main(args)


def _add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    import snella.pretrain  # only when the pretrain command is used: it is another module's business

    snella.pretrain.add_arguments(parser)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from snella.bench.cli import add_bench_arguments

    add_bench_arguments(parser)


def _run_bench(args: argparse.Namespace) -> Any:
    from snella.bench.cli import run_bench

    return run_bench(args)


# name -> (one-line help, add its arguments, run it)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Any]]] = {
    "finetune": (finetune.__doc__, _add_finetune_arguments, _run_finetune),
    "evaluate": (evaluate.__doc__, _add_evaluate_arguments, _run_evaluate),
    "predict": (predict.__doc__, _add_predict_arguments, _run_predict),
    "merge": (merge.__doc__, _add_merge_arguments, _run_merge),
    "pretrain": ("Pretrain the snella-default backbone (a small ViT) on Fashion-MNIST.", _add_pretrain_arguments,
                 _run_pretrain),
    "bench": ("Benchmarks: peak training memory, step time, accuracy suite (snella bench memory|speed|accuracy).",
              _add_bench_arguments, _run_bench),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s own arguments are built (so `pretrain` is imported only when used)."""
    parser = argparse.ArgumentParser(
        prog="snella", description="Kernelized sparse fine-tuning (SNELLA / SNELL) of pretrained vision models.",
        epilog="`snella finetune` with no arguments runs the default: SNELLA on the snella-default ViT, mnist5k.")
    parser.add_argument("--version", action="version", version=f"snella {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        first_line = (help_text or "").strip().splitlines()[0]
        child = sub.add_parser(name, help=first_line, description=help_text)
        if name == command:
            add_arguments(child)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status.

    Errors a user can cause (bad settings, missing or corrupt files) print one message and return 2;
    a run stopped by a non-finite loss returns 1.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
    except ImportError as err:
        print(f"snella {command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from snella.train import NonFiniteLossError

    try:
        result = COMMANDS[args.command][2](args)
    except NonFiniteLossError as err:
        print(f"snella {args.command}: stopped: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ImportError) as err:
        print(f"snella {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"snella {args.command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
