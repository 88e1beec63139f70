"""SnellaModel: injects adapters into any PyTorch model, switches/merges them, saves and loads them."""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, SnellaConfig
from .layer import SnellaConv2d, SnellaLayer, SnellaLinear, matrix_name
from .targets import describe_targets, is_fused_qkv, resolve_targets

WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")
logger = logging.getLogger(__name__)


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and a trainable copy per adapter (e.g. a new classifier head).

    With the adapter disabled, the original runs, so ``disable_adapter()`` gives the base model.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False

    def add(self, adapter_name: str) -> None:
        """A copy for ``adapter_name``; which copy runs is ``active_adapter``, set by the model."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def forward(self, *args, **kwargs):
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


class SnellaModel(nn.Module):
    """A model with SNELLA adapters; forwards calls and unknown attributes to the wrapped model.

    Build it with ``get_snella_model(model, config)``; only the active adapter's ``snella_*`` parameters,
    its ``modules_to_save`` copies and its ``parameters_to_save`` are trainable.
    """

    def __init__(self, model: nn.Module, config: SnellaConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, SnellaConfig] = {}
        self.active_adapter: Optional[str] = None
        self.add_adapter(adapter_name, config)  # the first adapter becomes active

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: SnellaConfig) -> None:
        """Inject a new adapter into every target module; it is frozen and does not run until ``set_adapter``
        (with no adapter active, e.g. all deleted, it becomes the active one).

        All or nothing: when it raises, the model is left exactly as it was.
        """
        self._add_adapter(adapter_name, config)

    def _add_adapter(self, adapter_name: str, config: SnellaConfig, fill: Optional[Callable[[], None]] = None) -> None:
        """``add_adapter``, then ``fill()`` (``load_adapter`` copies saved weights in); a failure undoes every change."""
        if not isinstance(config, SnellaConfig):
            raise ValueError(f"config must be a SnellaConfig, got {type(config).__name__}")
        if not _ADAPTER_NAME.fullmatch(adapter_name):
            raise ValueError(f"adapter name {adapter_name!r} is invalid; use letters, digits, '_' or '-'")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        # check everything the user named before changing anything
        targets = self._targets(config)
        saved = {name: self._saved_module(name) for name in config.modules_to_save or []}
        for name in config.parameters_to_save or []:
            self._find_parameter(name)
        undo: list[Callable[[], None]] = []  # one step per change, run last first if anything fails
        try:
            for name in targets:
                module = self.base_model.get_submodule(name)
                if not isinstance(module, SnellaLayer):
                    module = self._replace(name, SnellaConv2d(module) if isinstance(module, nn.Conv2d)
                                           else SnellaLinear(module), undo)
                undo.append(functools.partial(_drop_layer_adapter, module, adapter_name, module.active_adapter))
                split = config.split_qkv and is_fused_qkv(name, module.base_layer)
                module.update_layer(adapter_name, config, split=split, layer_name=name)
                _match_mode(module, module.base_layer)  # new dropout modules take the model's mode
            for name, module in saved.items():
                if not isinstance(module, ModulesToSaveWrapper):
                    module = self._replace(name, ModulesToSaveWrapper(module), undo)
                undo.append(functools.partial(_drop_copy, module, adapter_name))
                module.add(adapter_name)
            self.peft_config[adapter_name] = config
            undo.append(functools.partial(self.peft_config.pop, adapter_name))
            if fill is not None:
                fill()
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        if self.active_adapter is None:
            self.set_adapter(adapter_name)
        else:
            self._set_active(self.active_adapter)  # new layers and copies must not run the new adapter
            for p in self._adapter_parameters(adapter_name):
                p.requires_grad_(False)
        logger.info(self.targets_summary(adapter_name))

    def _replace(self, name: str, wrapper: nn.Module, undo: list) -> nn.Module:
        """Put ``wrapper`` (around the module at ``name``) in its place, in the module's train/eval mode."""
        original = self.base_model.get_submodule(name)
        _match_mode(wrapper, original)
        self.base_model.set_submodule(name, wrapper)
        undo.append(functools.partial(self.base_model.set_submodule, name, original))
        return wrapper

    def _targets(self, config: SnellaConfig) -> list[str]:
        """The modules ``config`` adapts: its targets, less its ``modules_to_save`` and what is inside them.

        As in peft, a saved module is trained in full, so adapting it too would wrap it twice.
        """
        saved = config.modules_to_save or []
        try:
            return resolve_targets(self.base_model, config.target_modules, _exclude_saved(config.exclude_modules, saved),
                                   adapted_types=(SnellaLayer,), opaque_types=(ModulesToSaveWrapper,))
        except ValueError as err:
            error = err
        try:  # what the targets would be if saved modules counted: if all are saved, say so
            unsaved = resolve_targets(self.base_model, config.target_modules, config.exclude_modules,
                                      adapted_types=(SnellaLayer, ModulesToSaveWrapper))
        except ValueError:
            raise error from None
        if not saved or not all(_inside(name, saved) for name in unsaved):
            raise error
        raise ValueError(f"every module that target_modules={config.target_modules!r} selects is in "
                         f"modules_to_save={saved!r} (or inside one): a saved module is trained in full, not "
                         "adapted. Target other modules, or remove it from modules_to_save.") from None

    def _saved_module(self, name: str) -> nn.Module:
        """The module a ``modules_to_save`` entry names, refusing one that an adapter already adapts."""
        module = self._find_module(name, "modules_to_save")
        clash = [n for n in self.snella_layers() if _inside(n, [name]) or _inside(name, [n])]
        if clash:
            raise ValueError(f"modules_to_save entry {name!r} overlaps layers adapted by an existing adapter "
                             f"({clash[:3]}); a module is either adapted or trained in full. Save another module "
                             "or use a separate model.")
        return module

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one used in forward and the only one trainable."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        if self.merged_adapters():
            raise ValueError("unmerge_adapter() before switching adapters: the merged update would stay in the weights")
        self._set_active(adapter_name)
        self._mark_trainable(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; deleting the active one activates the first left, or none."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(self.peft_config)}")
        if adapter_name in self.merged_adapters():
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        for module in self.snella_layers().values():
            module.delete_adapter(adapter_name)
        for module in self.base_model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                _drop_copy(module, adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))
            else:
                self._set_active(None)

    def _set_active(self, adapter_name: Optional[str]) -> None:
        for module in self.base_model.modules():
            if isinstance(module, (SnellaLayer, ModulesToSaveWrapper)):
                module.active_adapter = adapter_name
        self.active_adapter = adapter_name

    def _adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        """The adapter's own parameters: its factors and scalars, and its copies of saved modules."""
        for module in self.base_model.modules():
            if isinstance(module, SnellaLayer):
                for store in (module.snella_A, module.snella_B, module.snella_alpha, module.snella_gamma, module.snella_beta):
                    if adapter_name in store:
                        yield store[adapter_name]
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                yield from module.modules_to_save[adapter_name].parameters()

    def _mark_trainable(self, adapter_name: str) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for p in self._adapter_parameters(adapter_name):
            p.requires_grad_(True)
        for name in self.peft_config[adapter_name].parameters_to_save or []:
            self._find_parameter(name).requires_grad_(True)

    def _adapter(self, adapter_name: Optional[str] = None) -> str:
        """``adapter_name``, or the active adapter, with a clear error when there is none."""
        name = adapter_name or self.active_adapter
        if name is None:
            raise ValueError("no adapter is active (the last one was deleted); add one with add_adapter() "
                             "or load_adapter() first")
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; adapters: {list(self.peft_config)}")
        return name

    def _find_module(self, name: str, field: str) -> nn.Module:
        try:
            return self.base_model.get_submodule(name)
        except AttributeError:
            top = [n for n, _ in self.base_model.named_children()]
            raise ValueError(f"{field} entry {name!r} is not a module of {type(self.base_model).__name__}; "
                             f"top-level modules: {top}") from None

    def _find_parameter(self, name: str) -> nn.Parameter:
        try:
            return self.base_model.get_parameter(name)
        except AttributeError:
            direct = [n for n, _ in self.base_model.named_parameters(recurse=False)]
            raise ValueError(f"parameters_to_save entry {name!r} is not a parameter of {type(self.base_model).__name__}; "
                             f"its own parameters: {direct}") from None

    def snella_layers(self) -> dict[str, SnellaLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SnellaLayer)}

    @property
    def targeted_module_names(self) -> list[str]:
        """Names of the modules the active adapter adapts, in model order (as peft's attribute)."""
        return self.targeted_modules()

    def targeted_modules(self, adapter_name: Optional[str] = None) -> list[str]:
        """Names of the modules ``adapter_name`` (default: the active adapter) adapts, in model order."""
        name = adapter_name or self.active_adapter
        return [n for n, layer in self.snella_layers().items() if name in layer.adapter_config]

    def targets_summary(self, adapter_name: Optional[str] = None) -> str:
        """One line: ``snella: adapted 72 matrices in 48 modules: blocks.{0..11}.attn.{qkv,proj}, ...``."""
        name = adapter_name or self.active_adapter
        which = "" if name == "default" else f" (adapter {name!r})"
        return f"snella{which}: " + describe_targets(self.targeted_modules(name), len(self.matrices(name)))

    def matrices(self, adapter_name: Optional[str] = None) -> list:
        """The adapted matrices of an adapter as ``allocator.MatrixRef``s, for the budget allocator."""
        from .allocator import MatrixRef

        name = self._adapter(adapter_name)
        refs = []
        for layer_name, layer in self.snella_layers().items():
            if name not in layer.adapter_config:
                continue
            A, B = layer.snella_A[name], layer.snella_B[name]
            for s, part in enumerate(layer.segments[name]):
                refs.append(MatrixRef(
                    name=matrix_name(layer_name, part), A=A, B=B, segment=s, numel=B.shape[2] * A.shape[2],
                    get_sparsity=lambda layer=layer, s=s: layer.sparsity[name][s],
                    set_sparsity=lambda v, layer=layer, s=s: layer.set_sparsity(name, s, v),
                    delta=lambda layer=layer, s=s: layer.matrix_delta(name, s)))
        return refs

    # ------------------------------------------------------------------ enable / merge
    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly what the base model computes."""
        modules = [m for m in self.base_model.modules() if isinstance(m, (SnellaLayer, ModulesToSaveWrapper))]
        try:
            for m in modules:
                m.disable_adapters = True
            yield
        finally:
            for m in modules:
                m.disable_adapters = False

    def merged_adapters(self) -> list[str]:
        return sorted({a for layer in self.snella_layers().values() for a in layer.merged_adapters})

    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Add the active adapter's update into the base weights (no inference cost; idempotent)."""
        self._adapter()
        for layer in self.snella_layers().values():
            layer.merge(safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self.snella_layers().values():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """Merge the active adapter and return the base model with plain layers (no snella needed to run it)."""
        self.merge_adapter(safe_merge=safe_merge)
        return self._unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the original model."""
        self.unmerge_adapter()
        return self._unload(keep_copies=False)

    def _unload(self, keep_copies: bool = True) -> nn.Module:
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, SnellaLayer):
                self.base_model.set_submodule(name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                use_copy = keep_copies and module.active_adapter in module.modules_to_save
                self.base_model.set_submodule(name, module.modules_to_save[module.active_adapter] if use_copy
                                              else module.original_module)
        return self.base_model

    # ------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ save / load
    def adapter_state_dict(self, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
        """What an adapter file holds: factors, scalars, per-matrix sparsity, saved modules/parameters.

        Keys drop the adapter name (``blocks.0.attn.qkv.snella_A``), so a file loads under any name.
        """
        name = self._adapter(adapter_name)
        config = self.peft_config[name]
        state: dict[str, torch.Tensor] = {}
        for layer_name, layer in self.snella_layers().items():
            if name not in layer.adapter_config:
                continue
            for attr in ("snella_A", "snella_B", "snella_alpha", "snella_gamma", "snella_beta"):
                store = getattr(layer, attr)
                if name in store:
                    state[f"{layer_name}.{attr}"] = store[name].detach()
            state[f"{layer_name}.snella_sparsity"] = torch.tensor(layer.sparsity[name], dtype=torch.float64)
        for module_name in config.modules_to_save or []:
            wrapper = self.base_model.get_submodule(module_name)
            for key, value in wrapper.modules_to_save[name].state_dict().items():
                state[f"{module_name}.{key}"] = value.detach()
        for pname in config.parameters_to_save or []:
            state[pname] = self._find_parameter(pname).detach()
        return state

    def save_pretrained(self, save_directory: Union[str, Path], adapter_name: Optional[str] = None) -> Path:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json``: never the base weights or dW."""
        name = self._adapter(adapter_name)
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu().contiguous() for k, v in self.adapter_state_dict(name).items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "library": "snella"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600 files; give the usual permissions
        tmp.replace(directory / WEIGHTS_NAME)  # atomic: a crash leaves the old file or the new one
        self.peft_config[name].save(directory)
        return directory

    def load_adapter(self, directory: Union[str, Path], adapter_name: str = "default",
                     is_trainable: bool = False) -> None:
        """Add an adapter from ``save_pretrained`` output and make it active.

        Unless ``is_trainable``, everything is frozen and the model is put in eval mode, as peft does.
        A file that does not fit leaves the model as it was.
        """
        config, state, weights = _read_adapter(directory)
        self._add_adapter(adapter_name, config, fill=lambda: self._load_state(adapter_name, state, weights))
        self.set_adapter(adapter_name)
        if not is_trainable:
            self._freeze_for_inference()

    def _freeze_for_inference(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _load_state(self, adapter_name: str, state: dict[str, torch.Tensor], source: Path) -> None:
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source} does not fit this model: missing keys {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}. Was it saved from another architecture?")
        for key, target in expected.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"{source}: shape mismatch for {key}: the file has {tuple(state[key].shape)}, "
                                 f"this model expects {tuple(target.shape)} (different rank, chunks or layer size?)")
        layers = self.snella_layers()
        with torch.no_grad():
            for key, target in expected.items():
                layer_name, _, attr = key.rpartition(".")
                if attr == "snella_sparsity" and layer_name in layers:
                    levels = state[key].tolist()
                    for s, v in enumerate(levels):
                        layers[layer_name].set_sparsity(adapter_name, s, v)
                else:
                    target.copy_(state[key].to(target.dtype))  # targets are views of live tensors

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: Union[str, Path], adapter_name: str = "default",
                        is_trainable: bool = False) -> "SnellaModel":
        """Wrap ``model`` and load a saved adapter into it; unless ``is_trainable``, frozen and in eval mode.

        A file that does not fit leaves ``model`` as it was.
        """
        config, state, weights = _read_adapter(directory)
        wrapped = cls(model, config, adapter_name)
        try:
            wrapped._load_state(adapter_name, state, weights)
        except BaseException:
            wrapped._unload(keep_copies=False)  # a fresh wrapper: unloading it gives back the model untouched
            raise
        if not is_trainable:
            wrapped._freeze_for_inference()
        return wrapped


def _read_adapter(directory: Union[str, Path]) -> tuple[SnellaConfig, dict[str, torch.Tensor], Path]:
    """The config, the tensors and the weights' path of a ``save_pretrained`` folder, before touching any model."""
    config = SnellaConfig.load(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter weights at {weights}; expected the output of save_pretrained()")
    return config, load_file(str(weights)), weights


def _drop_layer_adapter(layer: SnellaLayer, adapter_name: str, active: Optional[str]) -> None:
    """Undo ``update_layer`` (whole or partial) on a layer, giving it back its active adapter."""
    layer.delete_adapter(adapter_name)
    layer.active_adapter = active


def _match_mode(wrapper: nn.Module, inner: nn.Module) -> None:
    """Give ``wrapper``'s own modules the train/eval mode of ``inner``, leaving the modules inside ``inner`` as they are."""
    inside = set(inner.modules())
    for module in wrapper.modules():
        if module not in inside:
            module.training = inner.training


def _drop_copy(wrapper: ModulesToSaveWrapper, adapter_name: str) -> None:
    if adapter_name in wrapper.modules_to_save:  # ModuleDict.pop takes no default
        del wrapper.modules_to_save[adapter_name]


def _inside(name: str, modules: list[str]) -> bool:
    """True when the module ``name`` is one of ``modules`` or inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _exclude_saved(exclude: Optional[Union[list[str], str]], saved: list[str]) -> Optional[Union[list[str], str]]:
    """``exclude_modules`` widened to the saved modules and everything inside them, as one regex."""
    if not saved:
        return exclude
    parts = [rf"{re.escape(name)}(?:\..*)?" for name in saved]
    if isinstance(exclude, str):
        parts.append(exclude)
    elif exclude:
        parts += [rf"(?:.*\.)?{re.escape(name)}" for name in exclude]  # a list entry matches a name or a suffix
    return "|".join(f"(?:{part})" for part in parts)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def get_snella_model(model: nn.Module, config: SnellaConfig, adapter_name: str = "default") -> SnellaModel:
    """Wrap ``model`` with a SNELLA adapter: the entry point, as ``peft.get_peft_model``."""
    return SnellaModel(model, config, adapter_name)
