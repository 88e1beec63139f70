"""Writing a merged model as a plain timm checkpoint that loads without snella: weights + architecture JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

FORMAT = "snella-merged/1"


def vit_kwargs(model: nn.Module) -> Optional[dict[str, Any]]:
    """Constructor arguments of ``timm.models.VisionTransformer`` that rebuild ``model``; None if not a plain ViT.

    Read from the instance, so they also describe architectures registered outside timm (the
    project's vit_fmnist_d128). The caller checks them by rebuilding and comparing outputs.
    """
    from timm.models.vision_transformer import VisionTransformer

    if type(model) is not VisionTransformer:
        return None
    block = model.blocks[0]
    patch = model.patch_embed
    return {
        "img_size": list(patch.img_size), "patch_size": list(patch.patch_size),
        "in_chans": patch.proj.in_channels, "num_classes": model.num_classes, "global_pool": model.global_pool,
        "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim, "qkv_bias": block.attn.qkv.bias is not None,
        "qk_norm": not isinstance(block.attn.q_norm, nn.Identity),
        "init_values": 1e-5 if not isinstance(block.ls1, nn.Identity) else None,  # the value is in the weights
        "class_token": model.has_class_token, "pos_embed": "learn" if model.pos_embed is not None else "none",
        "no_embed_class": model.no_embed_class, "reg_tokens": model.num_reg_tokens,
        "pre_norm": not isinstance(model.norm_pre, nn.Identity), "final_norm": not isinstance(model.norm, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity), "dynamic_img_size": model.dynamic_img_size,
    }


def timm_create_args(model: nn.Module, name: str) -> Optional[dict[str, Any]]:
    """``timm.create_model`` arguments rebuilding ``model`` when ``name`` is an architecture timm itself registers."""
    import timm
    from timm.models import get_model_args, model_entrypoint

    if not timm.is_model(name) or not model_entrypoint(name).__module__.startswith("timm."):
        return None
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_args(model).items()}
    return {"model_name": name, "pretrained": False, **args}


def _same_outputs(a: nn.Module, b: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(example), b.eval()(example), atol=atol, rtol=1e-4)


def write_merged(model: nn.Module, architecture: str, output: Path, example: torch.Tensor,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``model``'s weights to ``output`` (safetensors) and how to rebuild it to ``output`` with .json.

    The JSON holds ``vit_kwargs`` (for ``timm.models.VisionTransformer(**vit_kwargs)``) and/or
    ``create_model`` (for ``timm.create_model(**create_model)``), each kept only if a model built
    from it with these weights gives the same outputs on ``example``.

    Args:
        model: a plain timm model (the adapter already merged), on the CPU.
        architecture: the backbone name the run used (timm name or 'vit_fmnist_d128').
        output: the .safetensors file to write.
        example: an input batch (B, C, H, W) for the check.
        extra: more fields for the JSON (classes, input transform, ...).

    Returns:
        The JSON written.

    Raises:
        ValueError: neither description rebuilds the model.
    """
    import timm

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    recipes: dict[str, Any] = {}
    vit = vit_kwargs(model)
    if vit is not None and _rebuilds(model, lambda: timm.models.VisionTransformer(**vit), state, example):
        recipes["vit_kwargs"] = vit
    create = timm_create_args(model, architecture)
    if create is not None and _rebuilds(model, lambda: timm.create_model(**create), state, example):
        recipes["create_model"] = create
    if not recipes:
        raise ValueError(f"cannot describe the {type(model).__name__} of architecture {architecture!r} as a plain timm "
                         "model (only timm architectures and ViTs are supported by merge)")
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output), metadata={"format": "pt", "library": "timm"})
    info = {"format": FORMAT, "architecture": architecture, "weights": output.name, **recipes, **extra,
            "load": ("import json, timm, safetensors.torch; cfg = json.load(open(JSON)); "
                     "model = timm.models.VisionTransformer(**cfg['vit_kwargs']) if 'vit_kwargs' in cfg "
                     "else timm.create_model(**cfg['create_model']); "
                     "model.load_state_dict(safetensors.torch.load_file(WEIGHTS))")}
    json_path(output).write_text(json.dumps(info, indent=2) + "\n")
    return info


def json_path(output: Path) -> Path:
    """The architecture JSON written beside a merged checkpoint: the same name with .json."""
    return output.with_suffix(".json")


def _rebuilds(model: nn.Module, build, state: dict[str, torch.Tensor], example: torch.Tensor) -> bool:
    """Whether ``build()`` loaded with ``state`` computes what ``model`` computes on ``example``."""
    try:
        rebuilt = build()
        rebuilt.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError):  # other keys or shapes, or arguments it does not take
        return False
    return _same_outputs(model, rebuilt, example)
