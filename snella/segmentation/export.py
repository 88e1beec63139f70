"""`snella merge` of a segmentation run: the merged encoder + decoder as a plain state dict and a JSON that rebuilds it
without snella (a ViT + progressive-upsampling head from the head's own source; an smp model by its arguments; a
Hugging Face SegFormer / SAM from its transformers config, the weights being the transformers model's own)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snella.training.export import FORMAT, json_path, vit_kwargs
from snella.training.outputs import save_tensors

VIT_LOAD = ("import json, timm, safetensors.torch; cfg = json.load(open(JSON)); ns = {}; "
            "exec(cfg['module_source'], ns); "
            "model = ns['ViTSegmenter'](timm.models.VisionTransformer(**cfg['vit_kwargs']), **cfg['segmenter_kwargs']); "
            "model.load_state_dict(safetensors.torch.load_file(WEIGHTS))")
HF_LOAD = ("import json, transformers, safetensors.torch; cfg = json.load(open(JSON)); "
           "model = getattr(transformers, cfg['transformers_class'])("
           "transformers.AutoConfig.for_model(**cfg['transformers_config'])); "
           "model.load_state_dict(safetensors.torch.load_file(WEIGHTS))")
SMP_LOAD = ("import json, safetensors.torch, segmentation_models_pytorch as smp; cfg = json.load(open(JSON)); "
            "model = smp.create_model(**cfg['smp']); model.load_state_dict(safetensors.torch.load_file(WEIGHTS))")


def describe(model: nn.Module, config: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(the JSON's recipe, the state dict to write, the load line) of a merged segmentation model.

    Raises:
        ValueError: a model this export does not describe.
    """
    from snella.segmentation.hf_models import HFSam, HFSegformer
    from snella.segmentation.models import SMP_DECODERS, SmpSegmenter
    from snella.segmentation.vit_head import ViTSegmenter

    if isinstance(model, (HFSegformer, HFSam)):
        inner = model.model
        config_dict = json.loads(json.dumps(inner.config.to_dict(), default=str))  # dtype objects -> names
        recipe = {"transformers_class": type(inner).__name__, "transformers_config": config_dict}
        return recipe, inner.state_dict(), HF_LOAD

    if isinstance(model, ViTSegmenter):
        import snella.segmentation.vit_head as vit_head

        encoder = vit_kwargs(model.encoder)
        if encoder is None:
            raise ValueError(f"merge writes ViT encoders that are timm VisionTransformers; "
                             f"{type(model.encoder).__name__} is not one")
        head = model.decode_head
        recipe = {"vit_kwargs": encoder, "module_source": inspect.getsource(vit_head),
                  "segmenter_kwargs": {"num_classes": model.num_classes, "indices": list(model.indices),
                                       "channels": head.classifier.in_channels}}
        return recipe, model.state_dict(), VIT_LOAD
    if isinstance(model, SmpSegmenter):
        decoder = config.decoder or "fpn"
        recipe = {"smp": {"arch": SMP_DECODERS[decoder], "encoder_name": f"tu-{config.model}",
                          "encoder_weights": None, "classes": model.num_classes, **config.model_kwargs}}
        return recipe, model.model.state_dict(), SMP_LOAD
    raise ValueError(f"merge writes ViT + vit-pup, smp (fpn, unet, deeplabv3plus) and Hugging Face SegFormer / SAM "
                     f"segmentation models, not a {type(model).__name__}; use the run's adapter/ folder "
                     "(snella evaluate / predict)")


def rebuild(info: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """Build the model as the JSON's load line does (``info`` the JSON, ``state`` the weights), returning the model.

    A Hugging Face model comes back inside snella's wrapper (``HFSegformer`` / ``HFSam``), which only resizes its
    input and logits, so that its outputs compare with the run's."""
    import timm

    namespace: dict[str, Any] = {}
    if "transformers_class" in info:
        import transformers

        from snella.segmentation.hf_models import HFSam, HFSegformer

        inner = getattr(transformers, info["transformers_class"])(
            transformers.AutoConfig.for_model(**info["transformers_config"]))
        inner.load_state_dict(state, strict=True)
        return (HFSam if info["transformers_config"].get("model_type") == "sam" else HFSegformer)(inner).eval()
    if "vit_kwargs" in info:
        exec(info["module_source"], namespace)  # the head's source as written to the JSON
        model = namespace["ViTSegmenter"](timm.models.VisionTransformer(**info["vit_kwargs"]),
                                          **info["segmenter_kwargs"])
    else:
        import segmentation_models_pytorch as smp

        model = smp.create_model(**info["smp"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a copy of each tensor that shares memory with an earlier one (SAM ties its prompt encoder's
    positional embedding to the model's): safetensors refuses shared tensors, and both keys must load."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def write_segmenter(merged: nn.Module, tuned: torch.Tensor, config: Any, output: Path, example: torch.Tensor,
                    extra: dict[str, Any]) -> dict[str, Any]:
    """Write ``merged``'s weights to ``output`` and the JSON beside it; checked by rebuilding from the JSON.

    ``tuned``: the adapted model's logits on ``example``, computed before the merge.

    Returns:
        The JSON written, with ``max_abs_logit_diff`` (tuned vs merged) and ``max_abs_rebuild_diff`` (merged vs
        the model rebuilt from the files).

    Raises:
        ValueError: the rebuilt model does not compute what the merged one does.
    """
    recipe, state, load = describe(merged, config)
    state = _unshared({k: v.detach().cpu().contiguous() for k, v in state.items()})
    with torch.no_grad():
        merged_logits = merged.eval()(example)
        tuned_diff = float((tuned - merged_logits).abs().max())
        rebuilt_diff = float((rebuild(recipe, state)(example) - merged_logits).abs().max())
    if rebuilt_diff > 1e-4:
        raise ValueError(f"merge: the model rebuilt from {output.name} differs from the merged run by "
                         f"{rebuilt_diff:.2e}; use the run's adapter/ folder with snella instead")
    architecture = config.model if not config.model == "snella-default" else "vit_fmnist_d128"
    save_tensors(state, output, metadata={"format": "pt", "library": "torch"})
    info = {"format": FORMAT, "task": "segmentation", "architecture": architecture, "weights": output.name,
            **recipe, **extra, "max_abs_logit_diff": tuned_diff, "max_abs_rebuild_diff": rebuilt_diff, "load": load}
    json_path(output).write_text(json.dumps(info, indent=2) + "\n")
    return info
