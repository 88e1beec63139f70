"""Which modules get adapters: the defaults per model family, and matching user-given targets."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

# Default targets per family, as regexes matched (fullmatch) against module names relative to the model
# being wrapped. Tried in order; the first family with a match wins. ``(?:.*\.)?`` lets a wrapper add
# a prefix (``model.``, ``backbone.``).
FAMILY_TARGETS: dict[str, str] = {
    # timm ViT / DeiT / EVA / BEiT, Swin (layers.N.blocks.M...), ConvNeXt (its MLP linears only, as the
    # authors): every linear map of each transformer block.
    "timm-transformer": r"(?:.*\.)?blocks\.\d+\.(?:attn\.(?:qkv|q_proj|k_proj|v_proj|proj)|mlp\.(?:fc1|fc1_g|fc1_x|fc2))",
    # Hugging Face transformers ViT / DeiT / BEiT-style encoders: transformers < 5 names
    # (encoder.layer.N.attention.attention.query ...) and transformers 5 names (layers.N.attention.q_proj ...).
    "hf-vit": r"(?:.*\.)?(?:encoder\.layer|layers)\.\d+\.(?:attention\.(?:attention\.(?:query|key|value)"
              r"|output\.dense|q_proj|k_proj|v_proj|o_proj)|intermediate\.dense|output\.dense|mlp\.(?:fc1|fc2))",
    # timm EfficientNet / MobileNet-style conv nets: the convs of every inverted-residual block.
    "timm-convnet": r"(?:.*\.)?blocks\.\d+\.\d+\.(?:conv_pw|conv_dw|conv_pwl|conv_exp)",
}
# Opt-in extras, by name: ``SnellaConfig(target_modules=targets.EXTRA_TARGETS["convnext-convs"])``.
EXTRA_TARGETS: dict[str, str] = {
    "convnext-convs": r"(?:.*\.)?stages\.\d+\.blocks\.\d+\.(?:conv_dw|mlp\.fc1|mlp\.fc2)",
}
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def candidate_modules(model: nn.Module, skip_types: tuple = ()) -> Iterable[tuple[str, nn.Module]]:
    """Named modules that could be adapted, not descending into already-adapted layers or ``skip_types``."""
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if name:
            yield name, module
        if isinstance(module, skip_types):
            continue
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def _matches(name: str, spec: Union[list[str], str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_targets(model: nn.Module, target_modules: Optional[Union[list[str], str]],
                    exclude_modules: Optional[Union[list[str], str]] = None,
                    adapted_types: tuple = (), opaque_types: tuple = ()) -> list[str]:
    """Names of the modules to adapt.

    Args:
        model: the model being wrapped.
        target_modules: names/suffixes, a regex, or None for the family defaults.
        exclude_modules: same forms; matches are removed.
        adapted_types: already-adapted layer types: adaptable, children not searched.
        opaque_types: types whose children are not searched and that are not adaptable (saved-module wrappers).

    Raises:
        ValueError: nothing matched (the message lists the module names that exist), or a matched module
            is of a type that cannot be adapted.
    """
    adaptable = SUPPORTED_TYPES + tuple(adapted_types)
    names = [(n, m) for n, m in candidate_modules(model, tuple(adapted_types) + tuple(opaque_types))]
    if target_modules is None:
        for pattern in FAMILY_TARGETS.values():
            chosen = [(n, m) for n, m in names if re.fullmatch(pattern, n) and isinstance(m, adaptable)]
            if chosen:
                break
        else:
            raise ValueError(
                f"no default targets for {type(model).__name__}: pass SnellaConfig(target_modules=[...]). "
                f"Adaptable modules: {_listing(names)}")
    else:
        chosen = [(n, m) for n, m in names if _matches(n, target_modules)]
        if not chosen:
            raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}. "
                             f"Adaptable modules: {_listing(names)}")
    if exclude_modules is not None:
        chosen = [(n, m) for n, m in chosen if not _matches(n, exclude_modules)]
    for n, m in chosen:
        if not isinstance(m, adaptable):
            raise ValueError(f"module {n!r} is a {type(m).__name__}, which SNELLA cannot adapt; accepted layer "
                             f"types: nn.Linear, nn.Conv2d (and subclasses). Narrow target_modules.")
        if isinstance(m, SUPPORTED_TYPES) and not has_plain_forward(m):
            raise ValueError(f"module {n!r} is a {type(m).__name__}, a subclass of {m.__class__.__mro__[1].__name__} "
                             "with its own forward (e.g. weight standardisation); the adapted layer would skip it "
                             "and compute something else. Exclude it with exclude_modules.")
    if not chosen:
        raise ValueError(f"every module matched by target_modules={target_modules!r} is excluded by "
                         f"exclude_modules={exclude_modules!r}")
    return [n for n, _ in chosen]


def has_plain_forward(module: nn.Module) -> bool:
    """True when the layer computes the plain linear/conv of its weight (what the adapted op reproduces).

    timm's ``Conv2dSame`` overrides forward only to pad, which the adapted conv handles itself.
    """
    if type(module).__name__ == "Conv2dSame":
        return True
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    return type(module).forward is base.forward


def is_fused_qkv(name: str, module: nn.Module) -> bool:
    """A fused q/k/v projection (timm's ``attn.qkv``): a Linear named '*qkv' with out = 3 * in."""
    return (isinstance(module, nn.Linear) and name.split(".")[-1] == "qkv"
            and module.out_features == 3 * module.in_features)


def _listing(named: list[tuple[str, nn.Module]], limit: int = 40) -> str:
    adaptable = [n for n, m in named if isinstance(m, SUPPORTED_TYPES)]
    shown = ", ".join(adaptable[:limit])
    more = f" ... and {len(adaptable) - limit} more" if len(adaptable) > limit else ""
    return (shown + more) or "(none: the model has no nn.Linear or nn.Conv2d)"
