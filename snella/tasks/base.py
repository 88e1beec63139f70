"""The task interface of `snella finetune` (what a task supplies to the shared loop) and the registry of tasks by name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:  # the loop's modules import this one, so these are for type hints only
    from snella.training.config import TrainConfig
    from snella.training.distributed import DistContext
    from snella.training.runs import Run

# Where the built-in tasks live; importing a module registers its task (the @register_task decorator).
# Listed by module so that the names are known (TrainConfig validates --task) before any is imported.
BUILTIN_TASKS = {"classification": "snella.tasks.classification", "segmentation": "snella.tasks.segmentation"}
TASKS: dict[str, type["Task"]] = {}


@dataclass
class TaskData:
    """The datasets of a run, transforms applied, each item an (input, target) pair.

    The targets are what the task's ``training_step`` and ``evaluate`` read: class indices
    (classification), masks of shape (H, W) (segmentation, transformed together with their image),
    class labels or a dummy 0 (diffusion).
    """

    train: Dataset
    test: Dataset
    val: Optional[Dataset] = None
    info: dict[str, Any] = field(default_factory=dict)  # written to run.json: what evaluate / predict need
    skipped: int = 0                                    # unreadable training items dropped (--skip-bad-images)


@dataclass
class StepOutput:
    """One training step of one process: the loss to back-propagate and what the progress shows.

    ``stats`` are sums over the ``count`` items of this process's batch, "loss" first: the loop
    sums them over processes and steps and shows each divided by the summed count, as
    ``train_<name>`` in the epoch record. A segmentation task counts images and sums per-image
    pixel accuracy; a diffusion task sums the noise-prediction loss only.
    """

    loss: torch.Tensor          # scalar: the mean over this process's batch
    stats: dict[str, float]
    count: int


Forward = Callable[..., Any]  # the model (DDP-wrapped where distributed) under the run's autocast


class Task:
    """What one kind of problem brings to the shared fine-tuning loop (``snella.train``).

    The loop owns the seeds, the sample order, autocast, the optimiser, the allocator, DDP,
    checkpoints and outputs; it never names a loss, a metric or a picture. A task owns those.
    Subclasses set ``name`` and register with ``@register_task``. Two tasks shaped the hooks:

    - segmentation: the model returns logits (B, C, H, W) and the targets are masks (B, H, W);
      ``augment`` shifts or flips image and mask together; ``evaluate`` sums a (C, C) confusion
      matrix over the test batches, all-reduces it (``distributed.all_reduce_sum``) and derives
      mIoU / Dice / pixel accuracy from it; ``write_pictures`` writes overlays.png;
      ``trained_in_full`` names the decoder.
    - diffusion: ``training_step`` draws noise and timesteps and calls ``forward(noisy, t)``,
      the loss is the noise-prediction MSE; ``evaluate`` samples images at the end and scores
      them (FID-like metrics, features reduced across ranks); ``write_pictures`` writes sample
      grids.
    """

    name: ClassVar[str] = ""
    # Settings whose TrainConfig default does not suit this task (its embedded data, epochs, ...): the CLI and
    # ``TrainConfig.for_task`` start from the dataclass defaults updated with these, before YAML and flags.
    defaults: ClassVar[dict[str, Any]] = {}

    # ---------------------------------------------------------------- model and data
    def load_train(self, config: TrainConfig) -> Any:
        """The training split as read from ``config.data``, before any transform (it may size the model)."""
        raise NotImplementedError

    def model_info(self, train: Any) -> dict[str, Any]:
        """What ``build_model`` needs from the data (classification: the class names); saved in run.json,
        so that a finished run's model is rebuilt without its data."""
        return {}

    def build_model(self, config: TrainConfig, info: dict[str, Any]) -> nn.Module:
        """The backbone with the task's new parts (a head, a decoder), before any method is applied.

        The loop seeds torch before the call, so new parts get the same init on every rank.
        """
        raise NotImplementedError

    def trained_in_full(self, config: TrainConfig, model: nn.Module) -> list[str]:
        """Names of the modules that train in full (a head, a decoder): the methods' ``modules_to_save``."""
        return []

    def datasets(self, config: TrainConfig, train: Any, model: nn.Module) -> TaskData:
        """Every split of the run with its transforms at the model's input (image and target together).

        Raises:
            ValueError: bad data (the message names the file or split and what is accepted).
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- training
    def augment(self, batch: tuple, config: TrainConfig, generator: torch.Generator) -> tuple:
        """Random augmentation of one CPU batch, drawn from ``generator`` only (seeded per epoch and rank by
        the loop, so a resumed run draws the same). Default: none."""
        return batch

    def training_step(self, forward: Forward, batch: tuple) -> StepOutput:
        """Loss and statistics of one batch (already on the device). ``forward(*inputs)`` runs the model."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation and reporting
    def evaluate(self, model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                 precision: str = "fp32", ctx: Optional[DistContext] = None) -> dict[str, Any]:
        """Metrics of ``model`` on ``dataset``, each process scoring its share and the sums all-reduced over
        ``ctx``'s processes, so every rank returns the same dict. Written to metrics.json as ``test_<key>``."""
        raise NotImplementedError

    def val_record(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The entries an epoch's record gets from ``evaluate`` on the validation split."""
        return {f"val_{k}": v for k, v in metrics.items()}

    def show(self, key: str, value: float) -> str:
        """How the epoch line prints one record entry (``train_loss``, a ``val_record`` key)."""
        return f"{key} {value:.4f}"

    def summary_lines(self, metrics: dict[str, Any]) -> list[str]:
        """The task's lines of the printed summary (its test metrics), indented by two spaces."""
        return [f"  test {k[5:]:<13} {v:.4f}" for k, v in metrics.items()
                if k.startswith("test_") and isinstance(v, float)]

    def write_pictures(self, out: Path, history: list[dict[str, Any]], model: nn.Module, data: TaskData,
                       device: torch.device, precision: str) -> list[Path]:
        """The run's pictures (rank 0 only, after training): curves, overlays, sample grids. Default: none."""
        return []

    # ---------------------------------------------------------------- the run tools
    def evaluate_run(self, run: Run, data: Optional[str], split: str, batch_size: int, precision: str,
                     limit: Optional[int]) -> dict[str, Any]:
        """`snella evaluate`: the metrics of a finished run on a split of ``data`` (default: its own)."""
        raise NotImplementedError(f"task {self.name!r} has no `snella evaluate`")

    writes_predictions = False  # whether `predict` writes files (then it takes ``output_dir=``)

    def predict(self, run: Run, files: list[Path], top_k: int, batch_size: int,
                precision: str) -> list[dict[str, Any]]:
        """`snella predict`: one result per image file (labels, or mask files written; a task that writes files
        sets ``writes_predictions`` and takes ``output_dir: Optional[Path]`` as a keyword)."""
        raise NotImplementedError(f"task {self.name!r} has no `snella predict`")

    def export(self, run: Run, output: Path) -> dict[str, Any]:
        """`snella merge`: write the merged model to ``output`` and return what was written."""
        raise NotImplementedError(f"task {self.name!r} has no `snella merge`")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``--task cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name; set the class attribute `name`")
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Every task ``--task`` accepts: the built-in ones and any registered since."""
    return sorted(set(BUILTIN_TASKS) | set(TASKS))


def get_task(name: str) -> Task:
    """The task called ``name`` (importing a built-in one on first use), or a ValueError listing them."""
    if name not in TASKS and name in BUILTIN_TASKS:
        importlib.import_module(BUILTIN_TASKS[name])
    if name not in TASKS:
        raise ValueError(f"task={name!r} is invalid; accepted: {', '.join(task_names())}")
    return TASKS[name]()
