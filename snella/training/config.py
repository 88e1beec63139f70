"""TrainConfig: every setting of a fine-tuning run, with the default recipe, YAML loading and validation."""

from __future__ import annotations

import re
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from snella.allocator import SCHEDULES, SCORES, AllocatorConfig
from snella.config import DROPOUT_EXCLUDE, SettingError, SnellaConfig
from snella.data.checks import SPLITS
from snella.data.transforms import TRANSFORM_NAMES
from snella.functional import COMPETITION_MODES, KERNELS
from snella.tasks.base import task_names
from snella.training.norm import BN_STATS

# Settings only the segmentation task reads, with their defaults: another task refuses other values.
SEGMENTATION_FIELDS = {"decoder": None, "ignore_index": 255, "dice_weight": None, "num_classes": None,
                       "classes_file": None, "image_column": None, "mask_column": None}
SEGMENTATION_DECODERS = ("fpn", "unet", "deeplabv3plus", "vit-pup")  # snella.segmentation.models, checked there
PAIRED_TRANSFORMS = ("flip-crop", "resize", "none")  # snella.segmentation.transforms: image and mask together

METHODS = ("snella", "snell", "lora", "full", "linear")
PRECISIONS = ("fp32", "bf16")
# Settings that change how a run is carried out, not what it computes: a resumed run may change them.
RUN_ONLY = ("output_dir", "overwrite", "resume", "progress", "num_workers", "device",
            "debug_step_delay", "debug_nan_step")
PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# TrainConfig's name of each AllocatorConfig field; SnellaConfig's fields keep their own names here.
ALLOCATOR_FIELDS = {"target_sparsity": "sparsity", "init_sparsity": "init_sparsity", "score": "score",
                    "schedule": "allocation", "interval_steps": "allocation_interval",
                    "adaptive_threshold": "adaptive_threshold", "beta1": "allocation_beta1",
                    "beta2": "allocation_beta2", "warmup": "allocation_warmup", "final": "allocation_final"}


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """One fine-tuning run. The defaults are the recipe of `snella finetune` with no arguments.

    That recipe fine-tunes the project's Fashion-MNIST ViT on mnist5k with SNELLA; the values are
    tuned for that pair on a 2-core CPU (the paper's ViT-B recipe is in SPEC.md section 6).
    """

    # ---------------------------------------------------------------- task
    task: str = field(default="classification", metadata=_help(
        "What is learned: a registered task (snella.tasks), e.g. 'classification'."))

    # ---------------------------------------------------------------- model
    model: str = field(default="snella-default", metadata=_help(
        "Backbone: a timm name, 'vit_fmnist_d128', 'snella-default' (that ViT with the project's "
        "Fashion-MNIST weights) or 'hf:<folder>'."))
    weights: Optional[str] = field(default=None, metadata=_help(
        "Pretrained weight file (.npz, .pth, .pt, .safetensors) loaded into the backbone."))
    pretrained: bool = field(default=False, metadata=_help(
        "Download timm's own pretrained weights for the model (needs network; or give --weights FILE)."))
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help(
        "Extra keyword arguments of the backbone, e.g. 'depth=2,drop_path_rate=0.1' or '{depth: 2}'."))

    # ---------------------------------------------------------------- data
    data: str = field(default="mnist5k", metadata=_help(
        "Dataset: a built-in name (mnist5k, digits, faces, fashion-mnist), a folder, or "
        "imagefolder:|vtab:|fgvc:|hf:<folder>."))
    train_split: str = field(default="trainval", metadata=_help(
        f"Split trained on, one of {SPLITS}; 'trainval' is all training data (the final run)."))
    val_split: Optional[str] = field(default=None, metadata=_help(
        "Split evaluated after every epoch (for lr sweeps: train on 'train', validate on 'val'); none by default."))
    test_split: str = field(default="test", metadata=_help("Split of the final test accuracy."))
    transform: str = field(default="none", metadata=_help(
        f"Image transform, one of {TRANSFORM_NAMES}: 'vtab' resizes to image_size, 'fgvc' crops, "
        "'none' keeps the size."))
    image_size: Optional[int] = field(default=None, metadata=_help(
        "Side of the model's input for 'vtab'/'fgvc'; default: the model's own input size."))
    train_limit: Optional[int] = field(default=None, metadata=_help(
        "Train on this many images only (a fixed random subset, the same for every seed): quick checks."))
    random_shift: int = field(default=1, metadata=_help(
        "Augmentation: translate each training image by a random offset of up to this many pixels "
        "(edge pixels repeated); 0 turns it off (the VTAB protocol)."))
    test_limit: Optional[int] = field(default=None, metadata=_help(
        "Evaluate on this many images of the val/test splits only (a fixed random subset)."))
    skip_bad_images: bool = field(default=False, metadata=_help(
        "Drop unreadable images (counted in metrics.json) instead of stopping with an error naming the file."))

    # ---------------------------------------------------------------- method
    method: str = field(default="snella", metadata=_help(
        f"One of {METHODS}: snella (mixed kernel + budget allocation), snell (piecewise kernel, fixed "
        "sparsity), lora (peft), full (every weight), linear (head only)."))
    r: int = field(default=8, metadata=_help("Rank of the kernel factors (snella, snell) or of LoRA."))
    chunks: int = field(default=2, metadata=_help("Kernel chunks P (snella, snell); must divide r."))
    kernel: Optional[str] = field(default=None, metadata=_help(
        f"Kernel of snella / snell, one of {KERNELS}; default: the method's (snella: mixed, snell: piecewise)."))
    chunk_scale: float = field(default=0.1, metadata=_help(
        "Magnitude of the fixed chunk coefficients c_p = chunk_scale * (-1)^p (snella, snell)."))
    init_scale: float = field(default=1.0, metadata=_help(
        "Multiplier on the Kaiming-uniform bound of the kernel factors' init (snella, snell)."))
    sparsity: float = field(default=0.3, metadata=_help(
        "Fraction of each update's entries zeroed: snella's target at the end of the schedule, snell's fixed level."))
    init_sparsity: float = field(default=0.01, metadata=_help(
        "snella: sparsity of every matrix in the first allocation interval (authors: 0.01, almost dense)."))
    sparsity_pattern: dict[str, float] = field(default_factory=dict, metadata=_help(
        "Per-matrix sparsity (snell; snella's starting levels): {regex on the matrix name: sparsity}, e.g. "
        "'{blocks\\.0\\..*: 0.9}'; first full match wins."))
    competition: str = field(default="magnitude", metadata=_help(
        f"Weight-level competition, one of {COMPETITION_MODES}."))
    score: str = field(default="sensitivity", metadata=_help(f"snella's layer score, one of {SCORES}."))
    allocation: str = field(default="epoch", metadata=_help(
        f"When snella re-shares the budget, one of {SCHEDULES} (authors: every epoch)."))
    allocation_interval: Optional[int] = field(default=None, metadata=_help(
        "Optimizer steps between allocations for allocation 'steps' / 'adaptive'."))
    adaptive_threshold: float = field(default=0.05, metadata=_help(
        "allocation 'adaptive': reallocate when the layer scores moved this much (total variation)."))
    allocation_beta1: float = field(default=0.85, metadata=_help(
        "snella: EMA factor of the sensitivity I_bar (AdaLoRA's value)."))
    allocation_beta2: float = field(default=0.85, metadata=_help(
        "snella: EMA factor of the sensitivity's uncertainty U_bar (AdaLoRA's value)."))
    allocation_warmup: int = field(default=0, metadata=_help(
        "snella: allocation intervals held at the initial budget (authors: 0)."))
    allocation_final: int = field(default=0, metadata=_help(
        "snella: allocation intervals held at the target budget at the end (authors: 0)."))
    target_modules: Optional[list[str]] = field(default=None, metadata=_help(
        "Modules adapted (snella, snell, lora): names or suffixes; default: every linear map of each block."))
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata=_help(
        "Modules never adapted (snella, snell): names or suffixes, or in YAML one regex string."))
    split_qkv: bool = field(default=True, metadata=_help(
        "snella, snell: split a fused qkv projection into q, k, v matrices with their own factors and sparsity."))
    head: Optional[list[str]] = field(default=None, metadata=_help(
        "Classifier module(s) trained in full; default: the model's own classifier (timm: 'head')."))
    train_cls_token: bool = field(default=True, metadata=_help(
        "Train the ViT class token too (snella, snell, lora), as the authors do."))
    parameters_to_save: Optional[list[str]] = field(default=None, metadata=_help(
        "More single parameters trained in place and saved with the adapter (snella, snell, lora), e.g. pos_embed."))
    adapter_dropout: float = field(default=0.0, metadata=_help(
        "Dropout on the adapter branch's input (authors: 0.1 at ViT-B scale)."))
    adapter_dropout_exclude: Optional[Union[list[str], str]] = field(default=DROPOUT_EXCLUDE, metadata=_help(
        "snella, snell: layers without adapter dropout, names or suffixes (in YAML also one regex string); "
        "default: the attention output projections, as the authors; none: every layer gets it."))
    adapter_drop_path: float = field(default=0.0, metadata=_help(
        "Drop-path on the adapter branch's output (snella, snell; authors: 0.1 at ViT-B scale)."))
    bn_stats: str = field(default="frozen", metadata=_help(
        f"BatchNorm running statistics while training, one of {BN_STATS}: 'frozen' keeps the pretrained "
        "ones (BN in eval mode; its weight and bias still train under 'full'), 'update' re-estimates them "
        "from the task's batches (torch's train mode). No effect on models without BatchNorm. BatchNorms "
        "inside the modules trained in full (a new segmentation decoder) always update theirs."))

    # ---------------------------------------------------------------- segmentation (task 'segmentation' only)
    decoder: Optional[str] = field(default=None, metadata=_help(
        f"Segmentation decoder, one of {SEGMENTATION_DECODERS}: 'vit-pup' (plain ViTs, their default), "
        "smp's 'fpn' (default for other timm encoders), 'unet', 'deeplabv3plus'; hf: models bring their own."))
    ignore_index: int = field(default=255, metadata=_help(
        "Segmentation: mask label of pixels that count for neither loss nor metrics (label maps of seg:/hf: data)."))
    dice_weight: Optional[float] = field(default=None, metadata=_help(
        "Segmentation: weight of the Dice term added to the loss; default: 1 for binary masks (BCE + Dice), "
        "0 for multi-class (cross-entropy)."))
    num_classes: Optional[int] = field(default=None, metadata=_help(
        "Segmentation, seg:/hf: data: classes of a multi-class label map (background included) when no class-name "
        "file names them; without it or classes_file masks are binary (0/1 or 0/255)."))
    classes_file: Optional[str] = field(default=None, metadata=_help(
        "Segmentation, seg:/hf: data: class names, one per line (line k names label k); seg: folders default to "
        "<folder>/classes.txt when it exists."))
    image_column: Optional[str] = field(default=None, metadata=_help(
        "Segmentation, hf: data: the image column; default: found by name (image, img, pixel_values)."))
    mask_column: Optional[str] = field(default=None, metadata=_help(
        "Segmentation, hf: data: the mask column; default: found by name (mask, label, annotation, ...)."))

    # ---------------------------------------------------------------- optimisation
    epochs: int = field(default=15, metadata=_help("Training epochs."))
    batch_size: int = field(default=128, metadata=_help(
        "Global batch size (split evenly across data-parallel processes)."))
    lr: float = field(default=2e-2, metadata=_help(
        "Peak learning rate; the kernel factors want 10-20x full fine-tuning's at this scale (DATA.md)."))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay; never on 1-D parameters."))
    warmup_epochs: int = field(default=1, metadata=_help("Epochs of linear warm-up from warmup_lr to lr."))
    warmup_lr: float = field(default=1e-6, metadata=_help("Learning rate at the first step."))
    min_lr: float = field(default=1e-5, metadata=_help("Floor of the cosine decay."))
    ema_decay: Optional[float] = field(default=None, metadata=_help(
        "Keep an EMA of the trainable parameters with this decay (e.g. 0.999; warmed up as TensorFlow's "
        "num_updates) and validate, test and save it instead of the last step's; none by default."))

    # ---------------------------------------------------------------- run
    seed: int = field(default=0, metadata=_help("Seed of the adapter init and of every epoch's sample order."))
    precision: str = field(default="fp32", metadata=_help(f"One of {PRECISIONS}; bf16 runs under autocast."))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'."))
    num_workers: int = field(default=0, metadata=_help(
        "DataLoader workers for datasets read from files (cached datasets need none)."))
    output_dir: Optional[str] = field(default=None, metadata=_help(
        "Where the run's files go; default runs/<method>-<data>-<YYYYmmdd-HHMMSS>."))
    overwrite: bool = field(default=False, metadata=_help("Replace the run already in output_dir."))
    resume: bool = field(default=False, metadata=_help("Continue the run in output_dir from its last checkpoint."))
    progress: bool = field(default=True, metadata=_help("Show progress bars."))

    # ---------------------------------------------------------------- testing hooks
    debug_step_delay: float = field(default=0.0, metadata=_help(
        "Testing: sleep this many seconds after every optimizer step (to interrupt a run mid-epoch)."))
    debug_nan_step: Optional[int] = field(default=None, metadata=_help(
        "Testing: make the loss NaN at this optimizer step (1-based) to exercise the non-finite stop."))

    def __post_init__(self) -> None:
        _coerce_fields(self)

        def bad(name: str, accepted: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid; accepted: {accepted}")

        segmentation = self.task == "segmentation"
        choices = {"method": METHODS, "precision": PRECISIONS,
                   "transform": PAIRED_TRANSFORMS if segmentation else TRANSFORM_NAMES,
                   "train_split": SPLITS, "test_split": SPLITS, "bn_stats": BN_STATS, "task": task_names()}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                bad(name, ", ".join(accepted))
        if self.val_split is not None and self.val_split not in SPLITS:
            bad("val_split", ", ".join(SPLITS))
        if self.val_split is not None and self.train_split == "trainval" and self.val_split in ("train", "val"):
            bad("val_split", "a split disjoint from train_split='trainval' (train on 'train' to validate on 'val')")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                bad(name, "a positive integer")
        for name in ("image_size", "train_limit", "test_limit", "debug_nan_step"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "a positive integer or null")
        for name in ("warmup_epochs", "num_workers", "random_shift"):
            if getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        if self.warmup_epochs > self.epochs:
            bad("warmup_epochs", f"at most epochs={self.epochs}")
        if not self.lr > 0:
            bad("lr", "a number > 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            bad("ema_decay", "a number in (0, 1), e.g. 0.999, or null for no EMA")
        for name in ("weight_decay", "warmup_lr", "min_lr", "debug_step_delay"):
            if getattr(self, name) < 0:
                bad(name, "a number >= 0")
        self._check_task_settings(bad)
        if self.resume and self.output_dir is None:
            bad("resume", "true only with output_dir, the folder of the run to continue")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            bad("device", "auto, cpu, cuda or cuda:N")
        # The adapter's and the allocator's settings are checked by their own configs, once, and named
        # here as the flags a user gives.
        _delegate(lambda: self.snella_config("mixed"), {})
        # Without a budget to share (other methods, sparsity 0) init_sparsity has no target to stay
        # under; every allocator setting is still checked.
        target = None if self.uses_allocator else self.init_sparsity
        _delegate(lambda: self.allocator_config(target), ALLOCATOR_FIELDS)

    def _check_task_settings(self, bad) -> None:
        """Each task's own settings: checked for it, refused for another task (never silently ignored)."""
        if self.task != "segmentation":
            for name, default in SEGMENTATION_FIELDS.items():
                if getattr(self, name) != default:
                    bad(name, f"the default {default!r}: it is a segmentation setting (--task segmentation), "
                              f"task={self.task!r} does not read it")
            return
        if self.decoder is not None and self.decoder not in SEGMENTATION_DECODERS:
            bad("decoder", ", ".join(SEGMENTATION_DECODERS) + " or null (the model's default)")
        if self.ignore_index < 0:
            bad("ignore_index", "an integer >= 0 outside the class labels (255 by default)")
        if self.dice_weight is not None and self.dice_weight < 0:
            bad("dice_weight", "a number >= 0 or null (1 for binary masks, 0 for multi-class)")
        if self.num_classes is not None and self.num_classes < 2:
            bad("num_classes", "an integer >= 2 (background included) or null")
        # classification's settings: segmentation augments with --transform flip-crop and names no head
        if self.random_shift:
            bad("random_shift", "0 for task='segmentation' (it augments with --transform flip-crop; "
                                "TrainConfig.for_task('segmentation') starts from the task's defaults)")
        if self.head is not None:
            bad("head", "null for task='segmentation' (the decoder trains in full; choose it with --decoder)")
        if self.skip_bad_images:
            bad("skip_bad_images", "false for task='segmentation' (a bad image or mask stops the run, named)")

    @classmethod
    def for_task(cls, task: str, **settings: Any) -> "TrainConfig":
        """A config of ``task``: the dataclass defaults, then the task's own defaults (``Task.defaults``: its
        embedded data set, epochs...), then ``settings``."""
        return cls.from_dict({"task": task, **task_defaults(task), **settings}, source=f"task {task!r}")

    # ---------------------------------------------------------------- the configs built from it
    @property
    def uses_allocator(self) -> bool:
        """Whether the run shares a budget between matrices: SNELLA with a sparsity target above 0."""
        return self.method == "snella" and self.sparsity > 0

    def snella_config(self, kernel: str, modules_to_save: Optional[list[str]] = None,
                      parameters_to_save: Optional[list[str]] = None) -> SnellaConfig:
        """The SNELLA / SNELL adapter these settings describe (``kernel``: the method's unless --kernel is given)."""
        return SnellaConfig(
            r=self.r, chunks=self.chunks, kernel=self.kernel or kernel, sparsity=self.sparsity,
            sparsity_pattern=dict(self.sparsity_pattern), competition=self.competition,
            chunk_scale=self.chunk_scale, target_modules=self.target_modules, exclude_modules=self.exclude_modules,
            modules_to_save=modules_to_save, parameters_to_save=parameters_to_save, split_qkv=self.split_qkv,
            adapter_dropout=self.adapter_dropout, adapter_dropout_exclude=self.adapter_dropout_exclude,
            adapter_drop_path=self.adapter_drop_path, init_scale=self.init_scale)

    def allocator_config(self, target_sparsity: Optional[float] = None) -> AllocatorConfig:
        """SNELLA's budget allocator these settings describe (field names: ``ALLOCATOR_FIELDS``);
        ``target_sparsity`` replaces ``sparsity`` as the target."""
        values = {theirs: getattr(self, mine) for theirs, mine in ALLOCATOR_FIELDS.items()}
        if target_sparsity is not None:
            values["target_sparsity"] = target_sparsity
        return AllocatorConfig(**values)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build a config from a mapping, refusing keys that are not fields (a typo would be lost).

        Args:
            data: field name -> value; values are converted to the field's type ("1e-3" -> 0.001).
            source: what to call the mapping in errors (a file name).
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known settings: {', '.join(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[dict[str, Any]] = None) -> "TrainConfig":
        """Read a YAML file (a path, or the name of a packaged config), then apply ``overrides``."""
        return cls.from_dict({**read_yaml(path), **(overrides or {})}, source=str(path))

    def save_yaml(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def differences(self, other: "TrainConfig", ignore: tuple[str, ...] = RUN_ONLY) -> dict[str, tuple]:
        """Fields whose values differ, as name -> (self's value, other's value), skipping ``ignore``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}


def _delegate(build, names: dict[str, str]) -> Any:
    """``build()``, with a SettingError re-worded to TrainConfig's names (``names``: theirs -> ours)."""
    try:
        return build()
    except SettingError as err:
        ours = lambda name: names.get(name, name)  # noqa: E731
        accepted = re.sub(r"\b(\w+)=", lambda m: ours(m.group(1)) + "=", err.accepted)
        raise ValueError(f"{ours(err.name)}={err.value!r} is invalid; accepted: {accepted}") from None


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """The mapping in a YAML file; a bare name like 'lora' means snella/configs/lora.yaml."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (PACKAGED_CONFIGS / f"{path}.yaml").is_file():
        path = PACKAGED_CONFIGS / f"{path}.yaml"
    if not path.is_file():
        packaged = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"config file {path} does not exist; give a YAML file or a packaged config: {packaged}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value lines), got {type(data).__name__}")
    return data


def parse_mapping(text: str, name: str = "value") -> dict[str, Any]:
    """Parse 'a=1,b=x' or a YAML flow mapping '{a: 1, b: x}' into a dict with YAML-typed values."""
    text = text.strip()
    if not text:
        return {}
    try:
        if text.startswith("{"):
            data = yaml.safe_load(text)
        else:
            data = {}
            for item in text.split(","):
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(item)
                data[key.strip()] = yaml.safe_load(value.strip())
    except (yaml.YAMLError, ValueError) as err:
        raise ValueError(f"{name}={text!r} is invalid; accepted: 'key=value,key=value' or '{{key: value}}' "
                         f"({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name}={text!r} is not a mapping; accepted: 'key=value,...' or '{{key: value}}'")
    return data


# ---------------------------------------------------------------- type conversion


def _coerce_fields(config: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(config):
        setattr(config, f.name, coerce(f.name, getattr(config, f.name), hints[f.name]))


def coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML / command-line value to the field type ``hint``, or raise a ValueError naming the field.

    YAML 1.1 reads '1e-3' as a string, so numbers given as strings are accepted.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X], Optional[Union[list[str], str]]
        if type(None) in args and _is_none(value):
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and str in options:
            return value  # a YAML string stays one (a regex) where the field takes one
        return coerce(name, value, options[0])
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
        elif hint is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _fail()
        elif hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value) if isinstance(value, (int, float, str)) else _fail()
        elif hint is str:
            if isinstance(value, str):
                return value
        elif origin is list:
            items = [value] if isinstance(value, str) else value
            if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
                return list(items)
        elif origin is dict:
            if isinstance(value, str):
                return parse_mapping(value, name)
            if isinstance(value, dict) and all(isinstance(k, str) for k in value):
                return dict(value)
    except (TypeError, ValueError):
        pass
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a list of strings" if origin is list else "a mapping" if origin is dict else str(hint))
    raise ValueError(f"{name}={value!r} is invalid; accepted: {expected}")


def _is_none(value: Any) -> bool:
    """None, or 'none' / 'null' as YAML or a flag gives it (a one-item list from a list flag)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value is None or (isinstance(value, str) and value.lower() in ("none", "null"))


def _fail() -> Any:
    raise TypeError


def task_defaults(task: str) -> dict[str, Any]:
    """The settings ``task`` changes from the dataclass defaults (its ``Task.defaults``); a ValueError for an
    unknown task."""
    from snella.tasks.base import get_task

    return dict(type(get_task(task)).defaults)


def field_defaults() -> dict[str, Any]:
    """Each field's default value (the recipe of `snella finetune` with no arguments)."""
    out = {}
    for f in fields(TrainConfig):
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return out
