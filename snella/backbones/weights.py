"""Pretrained weights from files users have: Google .npz, PyTorch .pth/.pt/.bin (weights only), .safetensors."""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

TORCH_EXTS = (".pth", ".pt", ".bin")
# Where training scripts put the model inside a checkpoint, tried in this order (DINO's "teacher" last).
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state", "net", "teacher")
# Prefixes that wrappers add to key names: DDP, MoCo v3, Lightning-style modules, DINO, I-JEPA.
PREFIXES = ("module.base_encoder.", "module.", "model.", "backbone.", "encoder.")
SHOWN = 5  # keys listed per kind of problem in an error message


@dataclass
class LoadReport:
    """What `load_weights` did with each key.

    Attributes:
        loaded: Model keys set from the file.
        missing: Backbone keys of the model the file did not provide (left as initialised).
        unexpected: File keys the model has no place for.
        mismatched: File keys the model has with another shape, as "key: file (..) vs model (..)".
        dropped_head: The file's classifier keys, not loaded (another class count or another head).
        new_head: The model's classifier keys left at their fresh initialisation.
        ignored: File keys outside the wrapper prefix that was stripped (a momentum encoder, a
            projection head), never meant for the backbone.
        resampled: Keys resized to the model's grid before loading (position embeddings).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)
    new_head: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the count of each kind of key."""
        return ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in vars(self).items() if v)


def load_weights(model: nn.Module, path: str | Path, *, strict_backbone: bool = True) -> LoadReport:
    """Load pretrained weights from a file into `model`, keeping the model's own classifier head if it differs.

    Args:
        model: The model to fill (from `create_backbone` or any timm / torch model).
        path: A `.npz` (Google's ViT format, for timm models with `load_pretrained`), `.pth`/`.pt`/`.bin`
            (read with `torch.load(weights_only=True)` only; containers such as {"model": ...} or
            {"state_dict": ...} and prefixes such as "module." are unwrapped) or `.safetensors` file.
        strict_backbone: Raise when a backbone key is missing, unexpected or of another shape; when
            False, load what fits and list the rest in the report.

    Returns:
        A LoadReport listing what was loaded, dropped and left new.

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: Unknown extension, a file that would run code when unpickled, a corrupt file, or
            (strict_backbone) backbone keys that do not match, naming the first few with their shapes.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    ext = path.suffix.lower()
    if ext == ".npz":
        report = _load_npz(model, path, strict_backbone)
    elif ext in TORCH_EXTS or ext == ".safetensors":
        obj = _read_torch(path) if ext in TORCH_EXTS else _read_safetensors(path)
        report = apply_state_dict(model, find_state_dict(obj, path), source=str(path), strict_backbone=strict_backbone)
    else:
        raise ValueError(f"unknown weight file type {ext!r} for {path}: use .npz, .pth, .pt, .bin or .safetensors")
    logger.info("loaded %s: %s", path, report.summary())
    return report


def apply_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, strict_backbone: bool = True
) -> LoadReport:
    """Load a state dict into `model` after stripping wrapper prefixes, dropping a foreign head.

    Args:
        model: The model to fill.
        state_dict: Key -> tensor, possibly with wrapper prefixes ("module.", "backbone.", ...).
        source: Where the state dict came from, for messages.
        strict_backbone: As in `load_weights`.

    Returns:
        The LoadReport.
    """
    target = model.state_dict()
    sd, ignored = _match_prefixes(dict(state_dict), set(target))
    report = LoadReport(ignored=ignored)
    sd = _resample_pos_embed(model, sd, report)
    heads = _head_prefixes(model)

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    file_head = {k: v for k, v in sd.items() if is_head(k)}
    model_head = [k for k in target if is_head(k)]
    # The head loads all or nothing: only when the file's head is exactly the model's (same classes).
    head_fits = bool(file_head) and sorted(file_head) == sorted(model_head) and all(
        file_head[k].shape == target[k].shape for k in model_head
    )
    to_load: dict[str, torch.Tensor] = dict(file_head) if head_fits else {}
    report.dropped_head = [] if head_fits else sorted(file_head)
    report.new_head = [] if head_fits else model_head
    for key, value in sd.items():
        if is_head(key):
            continue
        if key not in target:
            report.unexpected.append(f"{key} {tuple(value.shape)}")
        elif value.shape != target[key].shape:
            report.mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        else:
            to_load[key] = value
    # BatchNorm fills num_batches_tracked itself when old checkpoints lack it.
    report.missing = [
        f"{k} {tuple(v.shape)}" for k, v in target.items()
        if k not in sd and not is_head(k) and not k.endswith("num_batches_tracked")
    ]
    _check(report, source, type(model).__name__, strict_backbone, loaded_any=bool(to_load))

    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filtered against the model's keys above
    report.loaded = list(to_load)
    return report


def find_state_dict(obj: object, source: str | Path) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping inside a loaded checkpoint, descending through CONTAINER_KEYS.

    Args:
        obj: What torch.load / safetensors returned.
        source: The file, for messages.

    Returns:
        The state dict (non-tensor entries beside the tensors are left out).
    """
    seen = obj
    while isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj = inner
    top = list(seen)[:10] if isinstance(seen, Mapping) else type(seen).__name__
    raise ValueError(
        f"{source} holds no state dict (top level: {top}); expected a mapping of parameter names to "
        f"tensors, possibly under one of the keys {list(CONTAINER_KEYS)}"
    )


def _read_torch(path: Path) -> object:
    """torch.load with weights_only=True: tensors and plain containers, never code from the file."""
    try:
        # argparse.Namespace holds the training arguments in MAE and DINO checkpoints; rebuilding
        # one only sets attributes, so it is safe to allow.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt or another format): {err}") from err
        found = re.search(r"GLOBAL (\S+)", str(err))
        reason = f"it asks for {found.group(1)}" if found else "see torch.load's weights_only"
        raise ValueError(
            f"refused to load {path}: unpickling it would execute code or build objects other than tensors "
            f"({reason}). If you trust the file, convert it once to safetensors, e.g. "
            "`python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{path}', weights_only=False); "
            "st.save_file(sd.get('model', sd), 'weights.safetensors')\"`, "
            "and pass the .safetensors file."
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError) as err:  # what a corrupt file raises
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated): {err}") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _match_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip (or add) wrapper prefixes while that makes more keys match the model's.

    Returns:
        The renamed state dict and the original names of keys dropped because they lay outside the
        prefix that was stripped.
    """
    origin = {k: k for k in sd}  # current name -> name in the file
    ignored: list[str] = []

    def n_match(d: Mapping[str, torch.Tensor]) -> int:
        return sum(k in model_keys for k in d)

    # A wrapper whose keys all start with one module name (HFImageClassifier's "model.") matches
    # files saved from the wrapped model once that name is added.
    first = {k.split(".", 1)[0] for k in model_keys}
    add = f"{first.pop()}." if len(first) == 1 and all("." in k for k in model_keys) else None
    while True:
        best, best_n = None, n_match(sd)
        for prefix in PREFIXES:
            n = n_match({k[len(prefix):]: None for k in sd if k.startswith(prefix)})
            if n > best_n:
                best, best_n = prefix, n
        if add and n_match({add + k: None for k in sd}) > best_n:
            sd, origin = {add + k: v for k, v in sd.items()}, {add + k: o for k, o in origin.items()}
            add = None  # once is enough
            continue
        if best is None:
            return sd, ignored
        ignored += [origin[k] for k in sd if not k.startswith(best)]
        origin = {k[len(best):]: origin[k] for k in sd if k.startswith(best)}
        sd = {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}


def _resample_pos_embed(model: nn.Module, sd: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Resize a ViT's absolute position embedding from the file's patch grid to the model's."""
    pos = sd.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    own = getattr(model, "pos_embed", None)
    if pos is None or grid is None or not isinstance(own, torch.Tensor) or pos.shape == own.shape:
        return sd
    n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    side = math.isqrt(pos.shape[1] - n_prefix)
    if pos.ndim != 3 or pos.shape[-1] != own.shape[-1] or side * side != pos.shape[1] - n_prefix:
        return sd  # not a square grid of the same width: reported as a shape mismatch
    from timm.layers import resample_abs_pos_embed

    # (1, n_prefix + side*side, D) -> (1, n_prefix + gh*gw, D)
    sd = dict(sd, pos_embed=resample_abs_pos_embed(
        pos, new_size=list(grid), old_size=[side, side], num_prefix_tokens=n_prefix, verbose=False
    ))
    report.resampled.append(f"pos_embed: grid {side}x{side} -> {grid[0]}x{grid[1]}")
    return sd


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s): timm's pretrained_cfg["classifier"], else *classifier modules."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if names:
        return (names,) if isinstance(names, str) else tuple(names)
    return tuple(n for n, _ in model.named_modules() if n.split(".")[-1].endswith("classifier") and n.count(".") <= 1)


def _check(report: LoadReport, source: str, model_name: str, strict: bool, loaded_any: bool) -> None:
    """Raise a ValueError naming the first few bad keys, if strict and the backbone does not fit."""
    problems = [("missing from the file", report.missing), ("unexpected in the file", report.unexpected),
                ("of another shape", report.mismatched)]
    if loaded_any and not (strict and any(keys for _, keys in problems)):
        return
    lines = [f"{len(keys)} keys {what}: " + "; ".join(keys[:SHOWN]) + (" ..." if len(keys) > SHOWN else "")
             for what, keys in problems if keys]
    lead = f"{source} does not fit {model_name}" + ("" if loaded_any else " (no key of the file matches the model)")
    hint = "" if not loaded_any else "\n  Pass strict_backbone=False to load the keys that fit and keep the rest."
    raise ValueError(lead + ":\n  " + "\n  ".join(lines) + hint)


def _load_npz(model: nn.Module, path: Path, strict: bool) -> LoadReport:
    """Google's JAX/Flax ViT .npz through timm's own loader (`model.load_pretrained`)."""
    loader = getattr(model, "load_pretrained", None)
    if not callable(loader):
        raise ValueError(
            f"{path}: .npz files (Google's JAX/Flax format) load only into timm models that support it "
            f"(VisionTransformer, ResNetV2, ...); {type(model).__name__} does not. Convert the file to "
            ".pth or .safetensors."
        )
    file_keys = _npz_shapes(path)
    report = LoadReport()
    # Encoder blocks beyond the model's depth would be skipped silently by timm's loader.
    depth = len(getattr(model, "blocks", []))
    file_blocks = {int(m.group(1)) for k in file_keys if (m := re.search(r"encoderblock_(\d+)/", k))}
    extra = sorted(b for b in file_blocks if b >= depth) if depth else []
    report.unexpected = [
        f"Transformer/encoderblock_{b}/* (file has {len(file_blocks)} blocks, model {depth})" for b in extra
    ]

    # Fill every float tensor with NaN first: whatever is still NaN afterwards was not written by the
    # loader (comparing values would miss keys whose loaded value equals the initial one).
    state = model.state_dict()
    backup = {k: v.detach().clone() for k, v in state.items()}
    floats = [k for k, v in state.items() if v.is_floating_point()]
    with torch.no_grad():
        for k in floats:
            state[k].fill_(float("nan"))
        try:
            loader(str(path))
        except (KeyError, RuntimeError, ValueError) as err:
            _restore(state, backup, state)
            embed = next((s for k, s in file_keys.items() if k.endswith("embedding/kernel")), None)
            raise ValueError(
                f"{path} does not fit {type(model).__name__} ({type(err).__name__}: {err}). The file has "
                f"{len(file_blocks)} encoder blocks and patch kernel {embed} (HWIO); the model has {depth} "
                "blocks. Pick the architecture the file was trained with."
            ) from err
        unloaded = [k for k in floats if torch.isnan(state[k]).any()]
        _restore(state, backup, unloaded)

        heads = _head_prefixes(model)
        is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
        report.loaded = [k for k in floats if k not in set(unloaded)]
        report.new_head = [k for k in unloaded if is_head(k)]
        report.missing = [f"{k} {tuple(state[k].shape)}" for k in unloaded if not is_head(k)]
        if report.new_head:
            report.dropped_head = sorted(k for k in file_keys if re.search(r"(^|/)head/(kernel|bias)$", k))
        try:
            _check(report, str(path), type(model).__name__, strict, loaded_any=bool(report.loaded))
        except ValueError:
            _restore(state, backup, state)  # a refused file leaves the model as it was
            raise
    return report


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array in an .npz file, reading each in full so that a corrupt file fails here.

    Raises:
        ValueError: not an .npz archive, truncated, or an array that does not decode; the message names the file.
    """
    # What numpy and zipfile raise on such files: a pickle or text where an archive should be (ValueError,
    # UnpicklingError is one), no data (EOFError), a cut or damaged archive (BadZipFile, zlib.error, OSError).
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds a single {type(npz).__name__}, not an archive of named arrays")
        with npz:
            return {k: npz[k].shape for k in npz.files}
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error, KeyError) as err:
        raise ValueError(f"{path} is not a readable .npz weight file (corrupt, truncated or another format; "
                         f"expected Google's ViT .npz archive): {type(err).__name__}: {err}") from err


def _restore(state: dict[str, torch.Tensor], backup: dict[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Copy `keys` of `backup` back into the model's `state` tensors, in place."""
    for k in keys:
        state[k].copy_(backup[k])
