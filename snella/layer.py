"""Adapted layers: a frozen base ``nn.Linear`` / ``nn.Conv2d`` plus any number of named SNELLA adapters."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as Fn
from .hooks import call_with_hooks, has_forward_hooks
from .config import SnellaConfig, check_sparsity
from .ops import Conv2dOp, DeltaSpec, LinearOp, adapted_op

QKV_PARTS = ("q", "k", "v")
ADAPTER_PREFIX = "snella_"


class SnellaLayer(nn.Module):
    """Wraps ``base_layer`` (never edited except by ``merge``) with SNELLA adapters.

    Per adapter the layer holds ``S`` matrices (3 for a split fused qkv projection, else 1), stacked:
    ``snella_A[name]`` ``(S, P, in, r/P)``, ``snella_B[name]`` ``(S, P, out/S, r/P)`` and, for kernels
    with scalars, ``snella_alpha/gamma/beta[name]`` ``(S,)``. Each matrix's sparsity is plain Python
    state (saved through ``get_extra_state``), so casting the model to bf16 cannot round it.

    Disabled or merged, the layer returns exactly the base layer's output. Forward hooks a user puts on
    ``base_layer`` (to extract features) run around the adapted computation, which stands in for it.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.snella_A = nn.ParameterDict()
        self.snella_B = nn.ParameterDict()
        self.snella_alpha = nn.ParameterDict()
        self.snella_gamma = nn.ParameterDict()
        self.snella_beta = nn.ParameterDict()
        self.snella_dropout = nn.ModuleDict()
        self.snella_drop_path = nn.ModuleDict()
        self.adapter_config: dict[str, SnellaConfig] = {}
        self.segments: dict[str, tuple[str, ...]] = {}  # adapter -> matrix suffixes ("",) or ("q","k","v")
        self.sparsity: dict[str, list[float]] = {}
        self.active_adapter: Optional[str] = None
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self._coefficients: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------ shapes (subclasses)
    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def fan_in(self) -> int:
        """Columns of the weight viewed as a matrix: ``in`` for Linear, ``in/groups*kh*kw`` for Conv2d."""
        raise NotImplementedError

    def _op(self):
        raise NotImplementedError

    def _prepare_input(self, x: Tensor) -> Tensor:
        return x

    # ------------------------------------------------------------------ weight seen by code that reads it
    @property
    def weight(self) -> Tensor:
        """The effective weight: ``W0 + dW`` of the active adapter, ``W0`` when disabled or merged.

        Some models read ``.weight`` instead of calling the layer (timm's EVA and BEiT pass
        ``attn.qkv.weight`` to ``F.linear`` with their own q/v biases); they must see the adapted weight,
        not fail nor silently skip the adapter. Gradients reach the factors by plain autograd here, so
        ``dW`` is kept for backward (forward through the layer itself does not keep it).
        """
        name = self.active_adapter
        if self.disable_adapters and self.merged:
            self.unmerge()  # as forward does: disabled means the base weights
        if self.disable_adapters or self.merged or name is None or name not in self.adapter_config:
            return self.base_layer.weight
        return self.base_layer.weight + self.get_delta_weight(name)

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: SnellaConfig, split: bool, layer_name: str = "") -> None:
        """Create adapter ``adapter_name``: factors initialised as SPEC.md section 2, sparsity from config."""
        if adapter_name in self.adapter_config:
            raise ValueError(f"adapter {adapter_name!r} already exists on layer {layer_name or type(self).__name__}")
        parts = QKV_PARTS if split else ("",)
        S, P, r = len(parts), config.chunks, config.r
        out_s = self.out_features // S
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        A = torch.empty(S, P, self.fan_in, r // P, device=weight.device, dtype=dtype)
        B = torch.empty(S, P, out_s, r // P, device=weight.device, dtype=dtype)
        for s in range(S):
            # Kaiming-uniform on each 3-D (P, n, r/P) tensor: fan-in = n * r/P, as the authors' init.
            nn.init.kaiming_uniform_(A[s], a=math.sqrt(5))
            nn.init.kaiming_uniform_(B[s], a=math.sqrt(5))
        self.snella_A[adapter_name] = nn.Parameter(A * config.init_scale)
        self.snella_B[adapter_name] = nn.Parameter(B * config.init_scale)
        if config.kernel in Fn.SCALAR_KERNELS:
            alpha, gamma, beta = Fn.scalar_init(config.kernel)
            for store, value in ((self.snella_alpha, alpha), (self.snella_gamma, gamma), (self.snella_beta, beta)):
                store[adapter_name] = nn.Parameter(torch.full((S,), value, device=weight.device, dtype=dtype))
        dropout = config.dropout_for(layer_name)  # 0 on attention output projections, as the authors
        self.snella_dropout[adapter_name] = nn.Dropout(dropout) if dropout else nn.Identity()
        self.snella_drop_path[adapter_name] = _DropPath(config.adapter_drop_path)
        self.adapter_config[adapter_name] = config
        self.segments[adapter_name] = parts
        self.sparsity[adapter_name] = [config.sparsity_for(matrix_name(layer_name, p)) for p in parts]
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for store in (self.snella_A, self.snella_B, self.snella_alpha, self.snella_gamma, self.snella_beta,
                      self.snella_dropout, self.snella_drop_path):
            if adapter_name in store:  # ParameterDict/ModuleDict.pop take no default
                del store[adapter_name]
        for store in (self.adapter_config, self.segments, self.sparsity):
            store.pop(adapter_name, None)
        in_use = {(c.chunks, c.chunk_scale) for c in self.adapter_config.values()}
        self._coefficients = {k: v for k, v in self._coefficients.items() if k[:2] in in_use}
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.adapter_config), None)

    def set_sparsity(self, adapter_name: str, segment: int, value: float) -> None:
        """Set one matrix's sparsity (the budget allocator calls this)."""
        check_sparsity(f"sparsity of matrix {segment} of adapter {adapter_name!r}", value)
        if self.adapter_config[adapter_name].competition == "none":
            Fn.check_no_competition([float(value)])
        self.sparsity[adapter_name][segment] = float(value)

    def factors(self, adapter_name: str) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        get = lambda store: store[adapter_name] if adapter_name in store else None  # noqa: E731
        return (self.snella_A[adapter_name], self.snella_B[adapter_name], get(self.snella_alpha),
                get(self.snella_gamma), get(self.snella_beta))

    def coefficients(self, adapter_name: str, device: torch.device) -> Optional[Tensor]:
        """The fixed chunk coefficients, cached per device, in the factors' dtype (float32, or float64 for a
        float64 layer: a float32 0.1 would move a float64 kernel by 1e-7 relative, the distances cancel).

        Keyed by what they are made of, so an adapter re-added under the same name with other ``chunks`` or
        ``chunk_scale`` cannot be given stale ones.
        """
        config = self.adapter_config[adapter_name]
        if config.kernel not in ("mixed", "piecewise"):
            return None
        dtype = self.snella_A[adapter_name].dtype
        key = (config.chunks, config.chunk_scale, device, dtype)
        if key not in self._coefficients:
            self._coefficients[key] = Fn.chunk_coefficients(config.chunks, config.chunk_scale, device=device,
                                                            dtype=dtype)
        return self._coefficients[key]

    def delta_spec(self, adapter_name: str) -> DeltaSpec:
        config = self.adapter_config[adapter_name]
        return DeltaSpec(config.kernel, config.competition, tuple(self.sparsity[adapter_name]))

    def _delta(self, adapter_name: str) -> Tensor:
        """Every matrix's sparse update, ``(S, out/S, in)`` float32, differentiable in the factors."""
        A, B, alpha, gamma, beta = self.factors(adapter_name)
        # Autocast off: under the caller's bf16 autocast (EVA/BEiT read ``.weight`` inside their forward)
        # the kernel's GEMMs would run in bf16 and the distance identity cancels (2% error in dW).
        with torch.autocast(A.device.type, enabled=False):
            delta, _ = self.delta_spec(adapter_name).delta(A, B, self.coefficients(adapter_name, A.device),
                                                           alpha, gamma, beta)
        return delta

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """The adapter's sparse update in the base weight's shape and dtype: what merge adds."""
        weight = self.base_layer.weight
        return self._delta(adapter_name).reshape(weight.shape).to(weight.dtype)

    def matrix_delta(self, adapter_name: str, segment: int) -> Tensor:
        """One matrix's current sparse update ``(out/S, in)``, without gradient."""
        with torch.no_grad():
            return self._delta(adapter_name)[segment]

    # ------------------------------------------------------------------ merge
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the update(s) to the base weight in place. Merging an adapter already merged does nothing."""
        names = adapter_names if adapter_names is not None else ([self.active_adapter] if self.active_adapter else [])
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; merging it again would add it twice, skipped")
                continue
            with torch.no_grad():
                delta = self.get_delta_weight(name)
                if safe_merge:
                    merged = self.base_layer.weight.data + delta
                    if not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs or infs found when merging adapter {name!r}; the adapter is broken")
                    self.base_layer.weight.data = merged
                else:
                    self.base_layer.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update from the base weight, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self.base_layer.weight.data -= self.get_delta_weight(name)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if has_forward_hooks(self.base_layer):  # the op below does not call base_layer: run its hooks here
            return call_with_hooks(self.base_layer, self.forward, (x, *args), kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.merged or name is None or name not in self.adapter_config:
            return self.base_layer(x, *args, **kwargs)
        config = self.adapter_config[name]
        factors = self.factors(name)
        coefficients = self.coefficients(name, x.device)
        spec = self.delta_spec(name)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if self.training and (isinstance(self.snella_dropout[name], nn.Dropout) or config.adapter_drop_path > 0):
            # Parallel path: base(x) + drop_path(x' @ dW^T) with x' = dropout(x): the adapter's
            # regularisers must see only the adapter branch, which a fused W0 + dW cannot give.
            z = self.snella_dropout[name](x)
            update = adapted_op(self._prepare_input(z), None, None, self._op(), spec, factors, coefficients)
            y = self.base_layer(x, *args, **kwargs)
            # ``update`` is fp32 below fp32 (ops.adapted_op): the sum is formed in fp32, and rounded once
            # to the model's dtype unless autocast is on (then fp32 carries the update's effect onwards).
            out = y + self.snella_drop_path[name](update)
            return out if torch.is_autocast_enabled(x.device.type) else out.to(y.dtype)
        return adapted_op(self._prepare_input(x), weight, bias, self._op(), spec, factors, coefficients)

    # ------------------------------------------------------------------ extra state: the sparsities
    def get_extra_state(self):
        return {"sparsity": {k: list(v) for k, v in self.sparsity.items()}}

    def set_extra_state(self, state) -> None:
        for name, levels in state.get("sparsity", {}).items():
            if name in self.sparsity:
                if len(levels) != len(self.sparsity[name]):
                    raise ValueError(f"saved sparsity for adapter {name!r} has {len(levels)} matrices, "
                                     f"this layer has {len(self.sparsity[name])}")
                self.sparsity[name] = [float(v) for v in levels]

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapter_config)}, active={self.active_adapter!r}, merged={self.merged_adapters}"


def _from_base(attr: str) -> property:
    """A read-only attribute of the base layer, so code that reads ``layer.in_features`` works on the wrapper."""
    return property(lambda self: getattr(self.base_layer, attr), doc=f"``base_layer.{attr}``")


class SnellaLinear(SnellaLayer):
    """SNELLA on an ``nn.Linear`` (weight ``(out, in)``)."""

    in_features = _from_base("in_features")

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def fan_in(self) -> int:
        return self.base_layer.in_features

    def _op(self):
        return LinearOp()


class SnellaConv2d(SnellaLayer):
    """SNELLA on an ``nn.Conv2d`` of any kernel size, stride, padding and groups.

    The weight ``(out, in/groups, kh, kw)`` is adapted as one ``(out, in/groups*kh*kw)`` matrix: each
    output channel's row already covers exactly its own group's inputs, so a grouped or depthwise
    conv needs no special case. Non-zero padding modes and 'same' padding are applied to the input
    first, as ``nn.Conv2d`` itself does, so the adapted op always runs with integer padding.
    """

    in_channels, out_channels = _from_base("in_channels"), _from_base("out_channels")
    kernel_size, stride, padding = _from_base("kernel_size"), _from_base("stride"), _from_base("padding")
    dilation, groups, padding_mode = _from_base("dilation"), _from_base("groups"), _from_base("padding_mode")
    in_features = _from_base("in_channels")  # as peft's conv layers: in/out_features are the channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    @property
    def fan_in(self) -> int:
        conv = self.base_layer
        return conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]

    def _op(self):
        conv = self.base_layer
        padding = (0, 0) if self._needs_prepad() or isinstance(conv.padding, str) else tuple(conv.padding)
        return Conv2dOp(tuple(conv.stride), padding, tuple(conv.dilation), conv.groups, tuple(conv.kernel_size))

    def _needs_prepad(self) -> bool:
        conv = self.base_layer
        return conv.padding_mode != "zeros" or isinstance(conv.padding, str) or type(conv).__name__ == "Conv2dSame"

    def _prepare_input(self, x: Tensor) -> Tensor:
        conv = self.base_layer
        if type(conv).__name__ == "Conv2dSame":  # timm's TF-style dynamic 'same' padding
            from timm.layers import pad_same

            return pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
        if conv.padding_mode != "zeros":
            return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        if conv.padding == "same":
            pads = []
            for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(x, pads)
        return x  # integer padding, or 'valid'


class _DropPath(nn.Module):
    """Per-sample drop-path (stochastic depth) on the adapter branch; identity in eval or at p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def matrix_name(layer_name: str, part: str) -> str:
    """The name of one adapted matrix: the layer's, plus '.q'/'.k'/'.v' for a split qkv."""
    return f"{layer_name}.{part}" if part else layer_name
