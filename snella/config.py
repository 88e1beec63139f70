"""The validated configuration of a SNELLA / SNELL adapter."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from .functional import COMPETITION_MODES, KERNELS

CONFIG_NAME = "adapter_config.json"
# The attention output projections of timm (attn.proj), CLIP/HF (out_proj, o_proj) and BERT-style
# encoders (attention.output.dense): the authors' adapter dropout skips them.
DROPOUT_EXCLUDE = r"(?:.*\.)?(?:attn\.proj|out_proj|o_proj|attention\.output\.dense)"


class SettingError(ValueError):
    """A bad value of one setting: which setting, its value and what is accepted.

    The fields let a caller that exposes the setting under another name (``snella finetune``'s
    TrainConfig) re-word the message without validating the value a second time.
    """

    def __init__(self, name: str, value, accepted: str, prefix: str = ""):
        self.name, self.value, self.accepted = name, value, accepted
        super().__init__(f"{prefix}{name}={value!r} is invalid; accepted: {accepted}")


@dataclass
class SnellaConfig:
    """Everything that defines an adapter; saved beside its weights as ``adapter_config.json``.

    Defaults follow the authors' SNELLA scripts (SPEC.md): rank 32 in 2 chunks, the mixed kernel,
    the magnitude competition. ``sparsity`` is each matrix's fraction of zeroed update entries; with
    the budget allocator it is the *target* and the allocator moves each matrix's level around it.
    """

    r: int = field(default=32, metadata={"help": "Rank: A is (P, in, r/P), B is (P, out, r/P); r*(in+out) parameters per matrix, as LoRA at rank r."})
    chunks: int = field(default=2, metadata={"help": "P, the number of kernel chunks; must divide r."})
    kernel: str = field(default="mixed", metadata={"help": f"How the factors become dW: one of {KERNELS}. 'mixed' is SNELLA, 'piecewise' is SNELL, 'linear' is LoRA's B A^T."})
    sparsity: float = field(default=0.0, metadata={"help": "Fraction of each dW's entries zeroed by the weight-level competition, in [0, 1). 0 = dense."})
    sparsity_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Per-layer sparsity: {regex on the layer name (a split qkv matrix is 'NAME.q'): sparsity}; first full match wins."})
    competition: str = field(default="magnitude", metadata={"help": f"Weight-level competition, one of {COMPETITION_MODES}: 'magnitude' keeps dW*|dW| (authors' code), 'soft' keeps dW*(|dW|-t) (SNELL eq. 5), both at every sparsity including 0; 'none' is the dense kernel dW itself (sparsity 0 only)."})
    chunk_scale: float = field(default=0.1, metadata={"help": "Magnitude of the fixed chunk coefficients c_p = chunk_scale * (-1)^p."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt: a list of names or name suffixes ('qkv', 'mlp.fc1'), or one regex matched against full names. None = the model family's defaults (snella.targets)."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules never adapted, same forms as target_modules."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. a new classifier 'head'); the base model keeps its own copy."})
    parameters_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Single parameters trained in place and saved with the adapter (e.g. ViT's 'cls_token'). disable_adapter() does not revert them."})
    split_qkv: bool = field(default=True, metadata={"help": "Split a fused qkv projection (a Linear named '*qkv' with out = 3*in) into q, k, v matrices with their own factors and sparsity, as the authors do."})
    adapter_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input while training (authors: 0.1). > 0 selects the parallel path."})
    adapter_dropout_exclude: Optional[Union[list[str], str]] = field(default=DROPOUT_EXCLUDE, metadata={"help": "Layers whose adapter input gets no dropout, same forms as target_modules. Default: the attention output projections (attn.proj, out_proj, o_proj, attention.output.dense), as the authors apply dropout on q, k, v, fc1 and fc2 only. None: every layer."})
    adapter_drop_path: float = field(default=0.0, metadata={"help": "Per-sample drop-path on the adapter branch's output while training (authors: 0.1). > 0 selects the parallel path."})
    init_scale: float = field(default=1.0, metadata={"help": "Multiplier on the Kaiming-uniform (a=sqrt(5)) bound of the factors' init."})

    def __post_init__(self):
        def bad(name, value, accepted):
            raise SettingError(name, value, accepted, prefix="SnellaConfig.")

        if not isinstance(self.r, int) or self.r < 1:
            bad("r", self.r, "a positive integer")
        if not isinstance(self.chunks, int) or self.chunks < 1:
            bad("chunks", self.chunks, "a positive integer")
        if self.r % self.chunks:
            bad("r", self.r, f"a multiple of chunks={self.chunks} (each chunk has r/chunks dimensions)")
        if self.kernel not in KERNELS:
            bad("kernel", self.kernel, ", ".join(KERNELS))
        if self.competition not in COMPETITION_MODES:
            bad("competition", self.competition, ", ".join(COMPETITION_MODES))
        check_sparsity("sparsity", self.sparsity)
        if self.competition == "none" and (self.sparsity != 0 or any(v != 0 for v in dict(self.sparsity_pattern).values())):
            bad("competition", self.competition, "'magnitude' or 'soft' with sparsity > 0; 'none' (the dense "
                "kernel, no competition) takes sparsity 0 and no sparsity_pattern levels above 0")
        for pattern, level in dict(self.sparsity_pattern).items():
            try:
                re.compile(pattern)
            except re.error as err:
                bad("sparsity_pattern", pattern, f"valid regular expressions ({err})")
            check_sparsity(f"sparsity_pattern[{pattern!r}]", level)
        for name in ("adapter_dropout", "adapter_drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                bad(name, value, "a probability in [0, 1)")
        for name in ("init_scale", "chunk_scale"):
            if not getattr(self, name) > 0:
                bad(name, getattr(self, name), "a positive number")
        for name in ("target_modules", "exclude_modules", "adapter_dropout_exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    bad(name, value, f"a valid regular expression or a list of names ({err})")
            elif value is not None and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                bad(name, value, "None, a list of module names, or a regex string")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    def dropout_for(self, layer_name: str) -> float:
        """The adapter dropout of one layer: 0 where ``adapter_dropout_exclude`` matches its name."""
        from .targets import name_matches

        if self.adapter_dropout_exclude is not None and name_matches(layer_name, self.adapter_dropout_exclude):
            return 0.0
        return float(self.adapter_dropout)

    def sparsity_for(self, matrix_name: str) -> float:
        """The configured sparsity of one matrix: the first matching ``sparsity_pattern``, else ``sparsity``."""
        for pattern, level in self.sparsity_pattern.items():
            if re.fullmatch(pattern, matrix_name):
                return float(level)
        return float(self.sparsity)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return {"method": "snella", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SnellaConfig":
        """Build a config from a dict, refusing unknown keys (they would otherwise be silently lost)."""
        data = {k: v for k, v in data.items() if k != "method"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SnellaConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "SnellaConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no adapter config at {path}; expected the output of save_pretrained()")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)


def check_sparsity(name: str, value) -> None:
    """Raise a ValueError unless ``value`` is a sparsity level in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise SettingError(name, value, "a fraction in [0, 1) (0 = dense, 0.9 keeps 10% of the update's entries)")
