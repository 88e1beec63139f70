"""Reopening a finished run: its config, task, classes and input transform, and the tuned model rebuilt from its adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from snella.backbones import create_backbone
from snella.tasks.base import Task, get_task
from snella.training.config import TrainConfig
from snella.training.data import InputSpec
from snella.training.distributed import pick_device
from snella.training.methods import Method, get_method
from snella.training.norm import load_batchnorm_stats
from snella.training.outputs import ADAPTER_DIR, CONFIG_FILE, RUN_FILE, read_json


@dataclass
class Run:
    """A finished run, loaded: the tuned model (eval mode, frozen) and what it needs to see images."""

    directory: Path
    config: TrainConfig
    classes: list[str]
    spec: Optional[InputSpec]
    method: Method
    model: nn.Module
    device: torch.device
    task: Optional[Task] = None
    info: Optional[dict] = None  # run.json as written by the loop


def load_run(directory: str | Path, device: str = "auto") -> Run:
    """Rebuild the tuned model of the run in ``directory`` from its backbone and its adapter folder.

    Args:
        directory: a run's output folder (config.yaml, run.json, adapter/).
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.

    Raises:
        FileNotFoundError: not a run folder, or the run has no adapter (it did not finish).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"run folder {directory} does not exist")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a snella run: it has no {CONFIG_FILE}")
    config = TrainConfig.from_yaml(config_file)
    info = read_json(directory / RUN_FILE)
    adapter = directory / ADAPTER_DIR
    if not adapter.is_dir():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_DIR}/: the run did not finish (resume it with "
                                f"snella finetune --output-dir {directory} --resume)")
    task = get_task(config.task)
    torch.manual_seed(config.seed)  # as in training: a backbone without weights gets the same random init
    backbone = task.build_model(config, info)
    method = get_method(config.method)
    model = method.load(config, backbone, adapter)
    load_batchnorm_stats(model, adapter)  # statistics a bn_stats='update' run re-estimated
    target = pick_device(device)
    model = model.to(target).eval()
    spec = InputSpec.from_dict(info["input"]) if "input" in info else None
    return Run(directory, config, list(info.get("classes", [])), spec, method, model, target, task, info)


def build_backbone(config: TrainConfig, num_classes: int) -> nn.Module:
    """The run's backbone with a ``num_classes`` head; a failed weight download is reported as bad input.

    Raises:
        ValueError: also when timm's pretrained weights cannot be downloaded (no network).
    """
    try:
        return create_backbone(config.model, num_classes, weights=config.weights, pretrained=config.pretrained,
                               **config.model_kwargs)
    except RuntimeError as err:
        if config.pretrained and "could not download" in str(err):
            raise ValueError(str(err)) from err
        raise


def merged_model(run: Run) -> nn.Module:
    """The run's tuned model as a plain backbone, the adapter folded into its weights."""
    return run.method.merge(run.model).eval()


def find_images(paths: list[str], extensions: Optional[tuple[str, ...]] = None) -> list[Path]:
    """Image files named by ``paths``: files as given, folders searched recursively (sorted).

    Raises:
        FileNotFoundError: a path that does not exist, or no image found at all.
    """
    from snella.data.folders import IMAGE_EXTENSIONS

    extensions = extensions or IMAGE_EXTENSIONS
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                            and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"image or folder {raw} does not exist")
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(extensions)}) in {', '.join(paths)}")
    return found
