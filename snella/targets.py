"""Which modules get adapters: the defaults per model family, and matching user-given targets."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

_ANY = r"(?:.*\.)?"  # any prefix a wrapper adds: ``model.``, ``backbone.``, ``vision_encoder.``

# Default targets: the linear maps of each transformer block (q, k, v, attention output, both MLP linears), as
# regexes fullmatched against module names. Resolved per module: a module is a default target when ANY family's
# pattern names it, so a model mixing naming styles (a timm block inside a HF wrapper) loses nothing. Left out:
# patch embeddings and merging, poolers, heads, SegFormer's spatial-reduction conv (K/V downsampling, only in
# stages with sr_ratio > 1) and Mix-FFN depthwise conv, Swinv2's position-bias MLP (2-D offsets -> head biases).
FAMILY_TARGETS: dict[str, str] = {
    # timm ViT / DeiT / EVA / BEiT, timm Swin (layers.N.blocks.M.*), timm ConvNeXt (stages.N.blocks.M.mlp: its MLP
    # linears only, as the authors); also the blocks.N.mlp.fc1/fc2 of Hugging Face Swin and SegFormer.
    "timm": _ANY + r"blocks\.\d+\.(?:attn\.(?:qkv|q_proj|k_proj|v_proj|proj)|mlp\.(?:fc1|fc1_g|fc1_x|fc2))",
    # transformers >= 5 attention: ViT, DeiT, DINOv2, Swin, SegFormer (attention.{q,k,v,o}_proj); CLIP at any
    # version (self_attn.{q,k,v,out}_proj).
    "hf-attention": _ANY + r"(?:layers?|blocks)\.\d+\.(?:attention|self_attn)\.(?:[qkvo]_proj|out_proj)",
    # MLPs of Hugging Face layer stacks: ViT / DINOv2 / CLIP fc1, fc2; DINOv2's SwiGLU (weights_in/weights_out
    # before transformers 5, gate/up/down_proj from 5); SAM's vision encoder lin1, lin2.
    "hf-mlp": _ANY + r"layers?\.\d+\.mlp\.(?:fc1|fc2|lin1|lin2|weights_in|weights_out|gate_proj|up_proj|down_proj)",
    # BERT-style names: BERT / RoBERTa, Swinv2, and before transformers 5 ViT / DeiT / DINOv2
    # (attention.attention.*), Swin (attention.self.*) and SegFormer (encoder.block.N.M, Mix-FFN mlp.dense1/2).
    "hf-bert-style": _ANY + r"(?:layers?|blocks|block\.\d+)\.\d+\.(?:attention\.(?:attention|self)\.(?:query|key|value)"
                            r"|attention\.output\.dense|intermediate\.dense|output\.dense|mlp\.dense[12])",
    # SAM's vision encoder: a fused attn.qkv (split into q, k, v like timm's) and attn.proj per layer.
    "sam-vision": _ANY + r"layers\.\d+\.attn\.(?:qkv|proj)",
    # Hugging Face ConvNeXt / ConvNeXt V2: the MLP linears of each block, as for timm ConvNeXt.
    "hf-convnext": _ANY + r"stages\.\d+\.layers\.\d+\.pwconv[12]",
    # timm EfficientNet / MobileNet-style conv nets: the convs of every inverted-residual block.
    "timm-convnet": _ANY + r"blocks\.\d+\.\d+\.(?:conv_pw|conv_dw|conv_pwl|conv_exp)",
}
# Parts the defaults never enter: decoders and heads (SegFormer's decode_head, SAM's mask_decoder, Mask2Former's
# pixel and transformer decoders, timm's head). Users fine-tune the encoder with SNELLA and train these in full
# (modules_to_save); name their modules in target_modules to adapt them instead.
NOT_DEFAULT = _ANY + r"(?:\w+_)?(?:decoder|head)\..+"  # under a part named decoder, *_decoder, head or *_head
# Opt-in extras, by name: ``SnellaConfig(target_modules=targets.EXTRA_TARGETS["convnext-convs"])``.
EXTRA_TARGETS: dict[str, str] = {
    # ConvNeXt's MLP linears and depthwise convs: timm (conv_dw, mlp.fc1/fc2) and Hugging Face (dwconv, pwconv1/2).
    "convnext-convs": _ANY + r"stages\.\d+\.(?:blocks\.\d+\.(?:conv_dw|mlp\.fc[12])"
                             r"|layers\.\d+\.(?:dwconv|pwconv[12]))",
}
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def is_default_target(name: str) -> bool:
    """True when some family's pattern names module ``name`` and it is not inside a decoder or head."""
    return (re.fullmatch(NOT_DEFAULT, name) is None
            and any(re.fullmatch(pattern, name) for pattern in FAMILY_TARGETS.values()))


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


def name_matches(name: str, spec: Union[list[str], str]) -> bool:
    """Whether a module name matches a user's spec: a regex (full match) or a list of names/suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def resolve_targets(model: nn.Module, target_modules: Optional[Union[list[str], str]],
                    exclude_modules: Optional[Union[list[str], str]] = None,
                    adapted_types: tuple = (), opaque_types: tuple = ()) -> list[str]:
    """Names of the modules to adapt.

    Args:
        model: the model being wrapped.
        target_modules: names/suffixes, a regex, or None for the defaults (``is_default_target``).
        exclude_modules: same forms; matches are removed.
        adapted_types: already-adapted layer types: adaptable, children not searched.
        opaque_types: types whose children are not searched and that are not adaptable (saved-module wrappers).

    Raises:
        ValueError: nothing matched (the message lists the module names that exist), or a matched module
            is of a type that cannot be adapted (a peft layer: the message names its ``base_layer``).
    """
    adaptable = SUPPORTED_TYPES + tuple(adapted_types)
    names = [(n, m) for n, m in candidate_modules(model, tuple(adapted_types) + tuple(opaque_types))]
    if target_modules is None:
        chosen = [(n, m) for n, m in names if is_default_target(n) and (isinstance(m, adaptable) or _is_peft_layer(m))]
        if not chosen:
            raise ValueError(
                f"no default targets for {type(model).__name__} (the defaults are the attention and MLP linears of "
                f"transformer blocks outside decoders and heads, snella.targets.FAMILY_TARGETS): pass "
                f"SnellaConfig(target_modules=[...]). Adaptable modules: {_listing(names)}")
    else:
        chosen = [(n, m) for n, m in names if name_matches(n, target_modules)]
        if not chosen:
            raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}. "
                             f"Adaptable modules: {_listing(names)}")
    if exclude_modules is not None:
        chosen = [(n, m) for n, m in chosen if not name_matches(n, exclude_modules)]
    for n, m in chosen:
        _check_adaptable(n, m, adaptable)
    if not chosen:
        raise ValueError(f"every module matched by target_modules={target_modules!r} is excluded by "
                         f"exclude_modules={exclude_modules!r}")
    return [n for n, _ in chosen]


def _check_adaptable(name: str, module: nn.Module, adaptable: tuple) -> None:
    """Raise a ValueError naming ``module``'s type and the fix when SNELLA cannot adapt it."""
    if _is_peft_layer(module):
        tuner = type(module).__module__.split(".")[2]
        raise ValueError(f"module {name!r} is a peft {tuner} layer ({tuner}.{type(module).__name__}); target its base "
                         f"layer {name + '.base_layer'!r} instead, or merge_and_unload() the peft model first")
    if not isinstance(module, adaptable):
        raise ValueError(f"module {name!r} is a {type(module).__name__}, which SNELLA cannot adapt; accepted layer "
                         f"types: nn.Linear, nn.Conv2d (and subclasses). Narrow target_modules.")
    if isinstance(module, SUPPORTED_TYPES) and not has_plain_forward(module):
        raise ValueError(f"module {name!r} is a {type(module).__name__}, a subclass of "
                         f"{module.__class__.__mro__[1].__name__} with its own forward (e.g. weight standardisation); "
                         "the adapted layer would skip it and compute something else. Exclude it with exclude_modules.")


def _is_peft_layer(module: nn.Module) -> bool:
    """A layer of a peft tuner (``peft.tuners.lora.Linear``...): it wraps the original as ``base_layer``."""
    return (type(module).__module__.startswith("peft.tuners.")
            and isinstance(getattr(module, "base_layer", None), nn.Module))


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


def describe_targets(names: list[str], matrices: Optional[int] = None) -> str:
    """One line saying what was adapted: ``adapted 72 matrices in 48 modules: blocks.{0..11}.attn.{qkv,proj}, ...``."""
    counted = f"{matrices} matrices in " if matrices is not None else ""
    return f"adapted {counted}{len(names)} modules: {compress_names(names)}"


def compress_names(names: list[str]) -> str:
    """Module names written compactly and exactly: the indices of names alike are folded into sets, and
    siblings into ``{a,b}``; a folded pattern stands for exactly the names given, in their order of appearance.

    Example: ``layers.{0,1,3}.blocks.{0,1}.attn.{qkv,proj}, layers.2.blocks.{0..5}.attn.{qkv,proj}`` for a Swin
    of depths (2, 2, 6, 2).
    """
    templates: dict[tuple, list[tuple[int, ...]]] = {}
    for name in names:  # 'blocks.3.attn.qkv' -> template ('blocks', None, 'attn', 'qkv'), indices (3,)
        parts = name.split(".")
        template = tuple(None if p.isdigit() else p for p in parts)
        templates.setdefault(template, []).append(tuple(int(p) for p in parts if p.isdigit()))
    folded = [_fill(template, sets) for template, indices in templates.items() for sets in _fold(indices)]
    siblings: dict[tuple[str, bool], list[str]] = {}  # (parent, is a whole name) -> leaves
    for name in folded:
        parent, _, leaf = name.rpartition(".")
        if "{" in leaf:  # the last part is a folded index: keep the name whole
            siblings[(name, True)] = [""]
        else:
            siblings.setdefault((parent, False), []).append(leaf)
    return ", ".join(_join(parent, leaves) for (parent, _), leaves in siblings.items())


def _fold(indices: list[tuple[int, ...]]) -> list[list[list[int]]]:
    """Index tuples as a union of exact products ``[set of 1st index, set of 2nd, ...]``: first indices whose
    remaining indices are the same are folded together (Swin stages of equal depth), recursively."""
    if not indices or not indices[0]:
        return [[]]
    tails: dict[int, list[tuple[int, ...]]] = {}
    for first, *rest in indices:
        tails.setdefault(first, []).append(tuple(rest))
    by_tail: dict[tuple, list[int]] = {}
    for first, rest in tails.items():
        by_tail.setdefault(tuple(rest), []).append(first)
    return [[firsts] + product for rest, firsts in by_tail.items() for product in _fold(list(rest))]


def _fill(template: tuple, sets: list[list[int]]) -> str:
    values = iter(sets)
    return ".".join(part if part is not None else _int_set(next(values)) for part in template)


def _int_set(values: list[int]) -> str:
    """[3] -> '3'; [0, 1] -> '{0,1}'; [0, 1, 2, 5] -> '{0..2,5}'."""
    values, runs = sorted(set(values)), []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ",".join(f"{a}..{b}" if b - a >= 2 else ",".join(map(str, range(a, b + 1))) for a, b in runs)
    return text if len(values) == 1 else "{" + text + "}"


def _join(parent: str, leaves: list[str]) -> str:
    if leaves == [""]:
        return parent
    leaf = leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}"
    return f"{parent}.{leaf}" if parent else leaf
