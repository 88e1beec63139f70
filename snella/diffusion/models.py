"""Diffusion denoisers: diffusers models read from folders (or the embedded Fashion-MNIST UNet), wrapped with their conditioning.

A run's model is a ``Denoiser``: ``forward(noisy, timesteps, labels)`` returns the prediction, whatever the network
(``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``Transformer2DModel``) and however it is
conditioned (class labels, prompt embeddings, none). Its diffusers network is ``denoiser.net``, so adapter and module
names read ``net.down_blocks.1.attentions.0.to_q``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

EMBEDDED_UNET = "snella-unet-fmnist"  # the project's class-conditional UNet pretrained on real Fashion-MNIST
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "unet_fmnist"  # a DDPMPipeline folder
PREFIX = "diffusers:"
NETWORKS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")
NETWORK_FOLDERS = ("unet", "transformer")  # where a pipeline folder keeps its denoiser
# Tokens of the learned prompt that stands in for a text encoder (one embedding per class name): at this scale one
# token carries the class; a real text encoder's 77 come from the folder when it has one.
PROMPT_TOKENS = 1

# The embedded UNet: 1.2M parameters, 28x28 grey, 10 class embeddings. Two downsamplings (28 -> 14 -> 7) so that
# MNIST-sized images need no resizing; self-attention at 14x14 and 7x7, where it is cheap.
FMNIST_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10, norm_num_groups=8,
    attention_head_dim=32)
# Its noise schedule (DDPM training, epsilon prediction); cosine betas suit small images better than linear ones.
FMNIST_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                               prediction_type="epsilon", clip_sample=True)


@dataclass
class DiffusionSpec:
    """A loaded diffusion model: the network, its training scheduler and what its folder held besides."""

    net: nn.Module
    scheduler: Any                # a diffusers DDPMScheduler (training noise schedule)
    source: str                   # the folder it came from
    text_encoder: Optional[Path] = None  # <folder>/text_encoder when the pipeline has one (with tokenizer/)


def network_kind(net: nn.Module) -> str:
    """The class name of a supported diffusers network, or a ValueError naming what is accepted."""
    name = type(net).__name__
    if name not in NETWORKS:
        raise ValueError(f"{name} is not a supported diffusion network; accepted: {', '.join(NETWORKS)}")
    return name


def conditioning_of(net: nn.Module) -> str:
    """How the network is conditioned: 'class' (class embeddings), 'prompt' (cross-attention states), 'none'."""
    kind, config = network_kind(net), net.config
    if kind == "UNet2DModel":
        return "class" if (config.num_class_embeds or config.class_embed_type) else "none"
    if kind == "UNet2DConditionModel":
        return "prompt"
    if kind == "DiTTransformer2DModel":
        return "class"
    if config.norm_type == "ada_norm_zero" or config.num_embeds_ada_norm:  # Transformer2DModel as DiT
        return "class"
    return "prompt" if config.cross_attention_dim else "none"


def load_diffusion_model(name: str) -> DiffusionSpec:
    """The network and scheduler ``name`` names: the embedded UNet, or ``diffusers:<folder>`` / a folder.

    A folder is a pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/`` and ``scheduler/``, as
    ``save_pretrained`` writes it) or a model folder (``config.json`` of a supported network; its scheduler from
    ``scheduler/`` or ``scheduler_config.json`` beside it, else diffusers' default DDPM schedule, said in a line).

    Raises:
        FileNotFoundError / ValueError: the folder is missing or holds no supported network (named).
    """
    import diffusers

    folder = EMBEDDED_DIR if name == EMBEDDED_UNET else Path(name[len(PREFIX):] if name.startswith(PREFIX) else name)
    if name == EMBEDDED_UNET and not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{EMBEDDED_UNET!r} needs {folder}, which does not exist yet: it is written by "
                                "`python -m snella.diffusion.pretrain unet`")
    if not folder.is_dir():
        raise FileNotFoundError(f"model={name!r}: {folder} is not a folder; accepted: {EMBEDDED_UNET!r} or "
                                f"'{PREFIX}<folder>' with a diffusers pipeline or model folder")
    model_dir = next((folder / sub for sub in NETWORK_FOLDERS if (folder / sub / "config.json").is_file()), folder)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model={name!r}: {folder} has no config.json, nor unet/ or transformer/ with one; "
                                "accepted: a folder written by diffusers' save_pretrained")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in NETWORKS:
        raise ValueError(f"model={name!r}: {config_file} describes {class_name!r}; accepted: {', '.join(NETWORKS)}")
    net = getattr(diffusers, class_name).from_pretrained(str(model_dir))
    scheduler_dir = next((d for d in (folder / "scheduler", model_dir / "scheduler", model_dir)
                          if (d / "scheduler_config.json").is_file()), None)
    if scheduler_dir is not None:
        scheduler = diffusers.DDPMScheduler.from_pretrained(str(scheduler_dir))
    else:
        print(f"{folder}: no scheduler_config.json; training with diffusers' default DDPMScheduler "
              "(1000 steps, linear betas, epsilon prediction)")
        scheduler = diffusers.DDPMScheduler()
    text = folder / "text_encoder"
    return DiffusionSpec(net, scheduler, str(folder), text if (text / "config.json").is_file() else None)


class Denoiser(nn.Module):
    """A diffusers network with the run's conditioning: ``forward(noisy, timesteps, labels) -> prediction``.

    - class-conditional networks get ``labels`` as ``class_labels``;
    - cross-attention networks get ``encoder_hidden_states``: a learned embedding per class (``prompts``, trained in
      full, standing in for a text encoder) or fixed embeddings of the class prompts from a real text encoder
      (``prompt_states``, a buffer);
    - unconditional networks ignore ``labels``.

    DiT's learned-variance channels are dropped: the prediction has the input's channels.
    """

    def __init__(self, net: nn.Module, num_classes: int, prompt_states: Optional[torch.Tensor] = None):
        super().__init__()
        self.net = net
        self.kind, self.conditioning = network_kind(net), conditioning_of(net)
        self.num_classes = num_classes
        self.prompts: Optional[nn.Embedding] = None
        if self.conditioning == "class":
            _fit_class_embeddings(net, num_classes)
        elif self.conditioning == "prompt":
            dim = net.config.cross_attention_dim
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            if prompt_states is not None:  # (num_classes, L, D) from a frozen text encoder
                if prompt_states.shape[0] != num_classes or prompt_states.shape[-1] != dim:
                    raise ValueError(f"prompt_states of shape {tuple(prompt_states.shape)} do not fit {num_classes} "
                                     f"classes and cross_attention_dim={dim}")
                self.register_buffer("prompt_states", prompt_states.clone())
            else:
                self.prompts = nn.Embedding(num_classes, PROMPT_TOKENS * dim)
                nn.init.normal_(self.prompts.weight, std=1.0)  # unit scale, like a normalised text embedding
                self.prompt_states = None
        self.channels = net.config.in_channels
        self.sample_size = _side(net.config.sample_size)

    def encoder_states(self, labels: torch.Tensor) -> torch.Tensor:
        """The cross-attention states of ``labels``: (B, L, D)."""
        if self.prompts is not None:
            return self.prompts(labels).view(len(labels), PROMPT_TOKENS, -1)
        return self.prompt_states[labels]

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network's prediction for ``noisy`` (B, C, H, W) at ``timesteps`` (B,) with class ``labels`` (B,)."""
        net = self.net
        if self.kind == "UNet2DModel":
            out = net(noisy, timesteps, class_labels=labels if self.conditioning == "class" else None).sample
        elif self.kind == "UNet2DConditionModel":
            out = net(noisy, timesteps, encoder_hidden_states=self.encoder_states(labels)).sample
        elif self.kind == "DiTTransformer2DModel":
            out = net(noisy, timestep=timesteps, class_labels=labels).sample
        else:
            states = self.encoder_states(labels) if self.conditioning == "prompt" else None
            out = net(noisy, encoder_hidden_states=states, timestep=timesteps,
                      class_labels=labels if self.conditioning == "class" else None).sample
        return out[:, :self.channels]  # (B, C, H, W); DiT's variance channels dropped

    def trained_in_full(self) -> list[str]:
        """The new or re-meant parts that train in full: class embeddings (a label now means another class)
        and the learned prompts."""
        if self.prompts is not None:
            return ["prompts"]
        if self.conditioning != "class":
            return []
        return [name for name, module in self.named_modules()
                if name.endswith("class_embedding") or name.endswith("class_embedder")]


def _fit_class_embeddings(net: nn.Module, num_classes: int) -> None:
    """Give a class-conditional network ``num_classes`` labels: a UNet2DModel whose count differs gets a resized
    embedding (its config updated, so a saved folder loads); a DiT must have at least as many (it uses the first).

    A resized embedding keeps the pretrained rows it has room for and starts new rows at their mean, as
    transformers' ``resize_token_embeddings`` does: a new class token starts as "some pretrained class".
    """
    kind = type(net).__name__
    if kind == "UNet2DModel":
        current = net.class_embedding
        if not isinstance(current, nn.Embedding):
            raise ValueError(f"UNet2DModel class_embed_type={net.config.class_embed_type!r} takes no class indices; "
                             "accepted: a UNet2DModel with num_class_embeds")
        old = current.num_embeddings
        if old != num_classes:
            print(f"UNet2DModel: {old} class embeddings, the run needs {num_classes}: the embedding resized "
                  f"(rows kept: {min(old, num_classes)}, new rows at the mean of the pretrained ones)")
            resized = nn.Embedding(num_classes, current.embedding_dim)
            with torch.no_grad():
                kept = min(old, num_classes)
                resized.weight[:kept] = current.weight[:kept]
                resized.weight[kept:] = current.weight.mean(0)
            net.class_embedding = resized
            net.register_to_config(num_class_embeds=num_classes)
        return
    available = net.config.num_embeds_ada_norm
    if available is None or available < num_classes:
        raise ValueError(f"{kind} has num_embeds_ada_norm={available} class labels, the run needs {num_classes}; "
                         "accepted: a network with at least as many")


def pretrained_classes(net: nn.Module) -> Optional[int]:
    """How many class labels a class-conditional network was trained with (None for other conditionings): where
    the few-image mode's new class token goes."""
    if conditioning_of(net) != "class":
        return None
    if type(net).__name__ == "UNet2DModel":
        return net.class_embedding.num_embeddings
    return net.config.num_embeds_ada_norm


def encode_prompts(folder: Path, prompts: list[str]) -> torch.Tensor:
    """Fixed cross-attention states (K, L, D) of ``prompts`` from a pipeline's ``text_encoder/`` and ``tokenizer/``
    (transformers; padded to the tokenizer's max length, as Stable Diffusion does)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder.parent / "tokenizer"))
    encoder = AutoModel.from_pretrained(str(folder)).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return encoder(input_ids=tokens.input_ids).last_hidden_state.float()  # (K, L, D)


def _side(sample_size: Any) -> int:
    """A square input side from a config's sample_size (an int or [H, W])."""
    if isinstance(sample_size, (list, tuple)):
        if sample_size[0] != sample_size[1]:
            raise ValueError(f"sample_size={list(sample_size)} is not square; accepted: square inputs")
        return int(sample_size[0])
    return int(sample_size)


def build_embedded_unet() -> nn.Module:
    """A freshly initialised network of the embedded UNet's architecture (what pretraining starts from)."""
    from diffusers import UNet2DModel

    return UNet2DModel(**FMNIST_UNET_CONFIG)


def build_scheduler(config: Optional[dict[str, Any]] = None):
    """A diffusers DDPMScheduler (default: the embedded UNet's schedule)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or FMNIST_SCHEDULER_CONFIG))
