"""Segmentation fixtures: the plain reference transcriptions importable by name, tiny Hugging Face model folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # sod_reference


@pytest.fixture(scope="session")
def tiny_segformer_dir(tmp_path_factory) -> Path:
    """A 2-stage random SegFormer saved with save_pretrained (what a user's hf:<folder> holds)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, num_labels=5)
    folder = tmp_path_factory.mktemp("segformer")
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory) -> Path:
    """A 2-layer random SAM (64 px input, 8 px patches) saved with save_pretrained."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(0)
    vision = SamVisionConfig(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                             image_size=64, patch_size=8, mlp_dim=64, global_attn_indexes=[1], window_size=4,
                             num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    folder = tmp_path_factory.mktemp("sam")
    SamModel(config).save_pretrained(folder)
    return folder
