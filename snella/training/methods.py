"""The fine-tuning methods compared by `snella finetune`: how each wraps a backbone, saves, loads and merges it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from snella.config import SnellaConfig
from snella.model import SnellaModel, get_snella_model
from snella.targets import describe_targets, resolve_targets
from snella.training.config import TrainConfig
from snella.training.outputs import save_tensors

FULL_WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
# LoRA through peft cannot save a plain parameter such as the class token: it goes in this file.
EXTRA_WEIGHTS = "extra_parameters.safetensors"


def head_modules(model: nn.Module, override: Optional[list[str]] = None) -> list[str]:
    """Names of the classifier module(s) trained in full: ``override``, else the model's own classifier.

    timm models name it in ``pretrained_cfg["classifier"]`` (a tuple for distilled ViTs).
    """
    names = override
    if names is None:
        found = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        names = [found] if isinstance(found, str) else list(found or [])
        names = [n for n in names if _has_module(model, n)]
        if not names and _has_module(model, "head"):
            names = ["head"]
    if not names:
        raise ValueError(f"cannot tell which module of {type(model).__name__} is the classifier; name it with "
                         f"--head (top-level modules: {[n for n, _ in model.named_children()]})")
    for name in names:
        if not _has_module(model, name):
            raise ValueError(f"head={name!r} is not a module of {type(model).__name__}; "
                             f"top-level modules: {[n for n, _ in model.named_children()]}")
    return list(names)


def cls_token_names(model: nn.Module) -> list[str]:
    """Names of the model's class-token parameters ('cls_token', or HF's 'model.vit.embeddings.cls_token')."""
    return [n for n, _ in model.named_parameters() if n == "cls_token" or n.endswith(".cls_token")]


def trained_parameters(config: TrainConfig, model: nn.Module) -> Optional[list[str]]:
    """Single parameters trained in place: the class token (``train_cls_token``) and ``parameters_to_save``."""
    names = (cls_token_names(model) if config.train_cls_token else []) + list(config.parameters_to_save or [])
    return names if config.train_cls_token or names else None


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _in_full(config: TrainConfig, model: nn.Module, trained_in_full: Optional[list[str]]) -> list[str]:
    return list(trained_in_full) if trained_in_full is not None else head_modules(model, config.head)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_tensors(state, path)


def _load_into(model: nn.Module, path: Path) -> None:
    """Load a partial state dict file into ``model``, refusing keys the model does not have."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}; is this the adapter folder of a finished run?")
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit the model: unexpected keys {result.unexpected_keys[:5]}")


class Method:
    """A way of fine-tuning: which parameters train, and what the adapter folder holds."""

    name = ""

    def apply(self, config: TrainConfig, backbone: nn.Module, trained_in_full: Optional[list[str]] = None) -> nn.Module:
        """Wrap or freeze ``backbone`` so that exactly this method's parameters have requires_grad.

        ``trained_in_full``: the task's modules that train in full (heads, decoders); None: the
        classifier ``head_modules`` finds.
        """
        raise NotImplementedError

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what is needed to rebuild the tuned model from the backbone into ``directory``."""
        raise NotImplementedError

    def load(self, config: TrainConfig, backbone: nn.Module, directory: Path) -> nn.Module:
        """The tuned model: ``backbone`` with the adapter in ``directory`` (frozen, for inference)."""
        raise NotImplementedError

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain backbone computing what the tuned ``model`` computes (the adapter folded in)."""
        return model

    def matrices(self, model: nn.Module) -> list:
        """The matrices taking part in the budget allocation (``allocator.MatrixRef``); [] if none."""
        return []

    def targets_summary(self, model: nn.Module) -> str:
        """One line naming the modules the method adapted ("" when it adapts none), printed by the loop."""
        return ""


class SnellaMethod(Method):
    """SNELLA (mixed kernel, budget allocation) or, with ``kernel='piecewise'``, SNELL at a fixed sparsity."""

    def __init__(self, name: str, kernel: str):
        self.name, self.kernel = name, kernel

    def adapter_config(self, config: TrainConfig, backbone: nn.Module,
                       trained_in_full: Optional[list[str]] = None) -> SnellaConfig:
        return config.snella_config(self.kernel, _in_full(config, backbone, trained_in_full),
                                    trained_parameters(config, backbone))

    def apply(self, config: TrainConfig, backbone: nn.Module, trained_in_full: Optional[list[str]] = None) -> nn.Module:
        return get_snella_model(backbone, self.adapter_config(config, backbone, trained_in_full))

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, config: TrainConfig, backbone: nn.Module, directory: Path) -> nn.Module:
        return SnellaModel.from_pretrained(backbone, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload(safe_merge=True)

    def matrices(self, model: nn.Module) -> list:
        return model.matrices()

    def targets_summary(self, model: nn.Module) -> str:
        return model.targets_summary()


def lora_targets(model: nn.Module, targets: list[str], r: int, chosen_by_user: bool) -> list[str]:
    """``targets`` less the grouped convs peft's LoRA cannot adapt at rank ``r`` (it needs r divisible by the
    conv's groups: a depthwise conv of 32 channels at r=8 is refused). Default targets lose them with a printed
    note; targets the user named raise, naming them.
    """
    modules = {n: model.get_submodule(n) for n in targets}
    grouped = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.groups > 1 and r % m.groups]
    if not grouped:
        return targets
    listing = describe_targets(grouped)
    if chosen_by_user:
        raise ValueError(f"target_modules match {len(grouped)} grouped convs peft's LoRA cannot adapt at r={r} (the "
                         f"rank must be divisible by the groups): {listing}; accepted: exclude them (--exclude-modules) "
                         "or a rank divisible by their groups")
    print(f"lora: not adapting {len(grouped)} grouped (depthwise) convs of the default targets, as peft's LoRA "
          f"needs r={r} divisible by their groups: {listing}")
    kept = [n for n in targets if n not in grouped]
    if not kept:
        raise ValueError(f"every default target is a grouped conv peft's LoRA cannot adapt at r={r}: {listing}; "
                         "pass --target-modules")
    return kept


class LoraMethod(Method):
    """peft's LoRA at rank r (alpha = r) on the same modules SNELLA adapts, plus the head and class token."""

    name = "lora"

    def apply(self, config: TrainConfig, backbone: nn.Module, trained_in_full: Optional[list[str]] = None) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        targets = lora_targets(backbone, resolve_targets(backbone, config.target_modules, config.exclude_modules),
                               config.r, chosen_by_user=config.target_modules is not None)
        heads = _in_full(config, backbone, trained_in_full)
        tokens = trained_parameters(config, backbone) or []
        lora = LoraConfig(r=config.r, lora_alpha=config.r, target_modules=targets, modules_to_save=heads,
                          lora_dropout=config.adapter_dropout)
        model = get_peft_model(backbone, lora)
        for name in tokens:  # peft freezes the base model; the class token trains in place
            backbone.get_parameter(name).requires_grad_(True)
        model.snella_extra_parameters = tokens  # what save() writes beside peft's files
        return model

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))
        base = model.get_base_model()
        extra = {n: base.get_parameter(n) for n in getattr(model, "snella_extra_parameters", [])}
        if extra:
            _save(extra, directory / EXTRA_WEIGHTS)

    def load(self, config: TrainConfig, backbone: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        if not (directory / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter in {directory} (adapter_config.json missing)")
        if (directory / EXTRA_WEIGHTS).is_file():
            _load_into(backbone, directory / EXTRA_WEIGHTS)
        model = PeftModel.from_pretrained(backbone, str(directory))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload(safe_merge=True)

    def targets_summary(self, model: nn.Module) -> str:
        return "lora: " + describe_targets(model.targeted_module_names)


class FullMethod(Method):
    """Every weight trains; the adapter folder holds the whole model."""

    name = "full"

    def apply(self, config: TrainConfig, backbone: nn.Module, trained_in_full: Optional[list[str]] = None) -> nn.Module:
        backbone.requires_grad_(True)
        return backbone

    def save(self, model: nn.Module, directory: Path) -> None:
        _save(model.state_dict(), directory / FULL_WEIGHTS)

    def load(self, config: TrainConfig, backbone: nn.Module, directory: Path) -> nn.Module:
        _load_into(backbone, directory / FULL_WEIGHTS)
        return backbone.requires_grad_(False)


class LinearMethod(Method):
    """A linear probe: only the classifier head trains; the adapter folder holds the head."""

    name = "linear"

    def apply(self, config: TrainConfig, backbone: nn.Module, trained_in_full: Optional[list[str]] = None) -> nn.Module:
        backbone.requires_grad_(False)
        for name in _in_full(config, backbone, trained_in_full):
            backbone.get_submodule(name).requires_grad_(True)
        return backbone

    def save(self, model: nn.Module, directory: Path) -> None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        _save({k: v for k, v in model.state_dict().items() if k in trainable}, directory / HEAD_WEIGHTS)

    def load(self, config: TrainConfig, backbone: nn.Module, directory: Path) -> nn.Module:
        _load_into(backbone, directory / HEAD_WEIGHTS)
        return backbone.requires_grad_(False)


METHODS: dict[str, Method] = {
    "snella": SnellaMethod("snella", "mixed"),
    "snell": SnellaMethod("snell", "piecewise"),
    "lora": LoraMethod(),
    "full": FullMethod(),
    "linear": LinearMethod(),
}


def get_method(name: str) -> Method:
    """The method called ``name``, or a ValueError listing them."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(METHODS)}")
    return METHODS[name]


def trainable_state(model: nn.Module) -> dict[str, object]:
    """The part of ``model.state_dict()`` a checkpoint needs: trainable parameters, buffers, extra state.

    Frozen weights are left out: they come back from the backbone's weight file. Extra state holds
    the SNELLA layers' per-matrix sparsities.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, _ in model.named_parameters()} - trainable
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: dict[str, object], source: str) -> None:
    """Load ``trainable_state`` output back, checking every trainable parameter is in it."""
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise ValueError(f"{source} does not fit this model: missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]} (was it written by a run with other settings?)")
