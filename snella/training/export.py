"""Writing a merged model as a plain timm or transformers checkpoint that loads without snella: weights + JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from snella.training.outputs import save_tensors

FORMAT = "snella-merged/1"
TIMM_LOAD = ("import json, timm, safetensors.torch; cfg = json.load(open(JSON)); "
             "model = timm.models.VisionTransformer(**cfg['vit_kwargs']) if 'vit_kwargs' in cfg "
             "else timm.create_model(**cfg['create_model']); "
             "model.load_state_dict(safetensors.torch.load_file(WEIGHTS))")
HF_LOAD = ("import json, transformers, safetensors.torch; cfg = json.load(open(JSON)); "
           "model = transformers.AutoModelForImageClassification.from_config("
           "transformers.AutoConfig.for_model(**cfg['transformers_config'])); "
           "model.load_state_dict(safetensors.torch.load_file(WEIGHTS))")


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


def hf_config(model: nn.Module, classes: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The transformers config (a JSON-safe dict) of a Hugging Face image classifier wrapped by snella's
    ``HFImageClassifier``, labelled with ``classes``; None for any other model.

    ``transformers.AutoConfig.for_model(**config)`` rebuilds the config from it.
    """
    from snella.backbones import HFImageClassifier

    if not isinstance(model, HFImageClassifier):
        return None
    config = json.loads(json.dumps(model.model.config.to_dict(), default=str))  # dtype objects -> names
    if classes is not None and len(classes) == config.get("num_labels", len(config.get("id2label", {}))):
        config["id2label"] = {str(i): c for i, c in enumerate(classes)}
        config["label2id"] = {c: i for i, c in enumerate(classes)}
    return config


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _same_outputs(a: nn.Module, b: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> bool:
    with torch.no_grad():
        return torch.allclose(_logits(a.eval()(example)), _logits(b.eval()(example)), atol=atol, rtol=1e-4)


def write_merged(model: nn.Module, architecture: str, output: Path, example: torch.Tensor,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``model``'s weights to ``output`` (safetensors) and how to rebuild it to ``output`` with .json.

    For a timm model the JSON holds ``vit_kwargs`` (for ``timm.models.VisionTransformer(**vit_kwargs)``)
    and/or ``create_model`` (for ``timm.create_model(**create_model)``); for a Hugging Face model
    (``hf:`` runs) it holds ``transformers_config`` (for ``AutoModelForImageClassification.from_config(
    AutoConfig.for_model(**transformers_config))``) and the weights are the transformers model's own.
    Each description is kept only if a model built from it with these weights gives the same outputs
    on ``example``.

    Args:
        model: the merged model (the adapter already folded in), on the CPU.
        architecture: the backbone name the run used (timm name, 'vit_fmnist_d128' or 'hf:<folder>').
        output: the .safetensors file to write.
        example: an input batch (B, C, H, W) for the check.
        extra: more fields for the JSON (classes, input transform, ...).

    Returns:
        The JSON written.

    Raises:
        ValueError: no description rebuilds the model.
    """
    import timm

    recipes: dict[str, Any] = {}
    hf = hf_config(model, extra.get("classes"))
    if hf is not None:
        from transformers import AutoConfig, AutoModelForImageClassification

        state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
        build = lambda: AutoModelForImageClassification.from_config(AutoConfig.for_model(**hf))  # noqa: E731
        if _rebuilds(model, build, state, example):
            recipes["transformers_config"] = hf
        library, load = "transformers", HF_LOAD
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        vit = vit_kwargs(model)
        if vit is not None and _rebuilds(model, lambda: timm.models.VisionTransformer(**vit), state, example):
            recipes["vit_kwargs"] = vit
        create = timm_create_args(model, architecture)
        if create is not None and _rebuilds(model, lambda: timm.create_model(**create), state, example):
            recipes["create_model"] = create
        library, load = "timm", TIMM_LOAD
    if not recipes:
        raise ValueError(
            f"merge cannot write the {type(model).__name__} of architecture {architecture!r}: it writes timm "
            "VisionTransformers, models that timm.create_model builds by name, and Hugging Face image "
            "classifiers (hf: runs), each checked by rebuilding it and comparing outputs, and no such rebuild "
            "of this model gave its outputs. Use the run's adapter/ folder with snella instead "
            "(snella evaluate / predict, or the method's from_pretrained on the backbone).")
    save_tensors(state, output, metadata={"format": "pt", "library": library})
    info = {"format": FORMAT, "architecture": architecture, "weights": output.name, **recipes, **extra,
            "load": load}
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
