"""BatchNorm statistics while training: 'frozen' keeps the pretrained ones, 'update' re-estimates them and the
adapter folder then carries them, so that a rebuilt run computes what the trained model computed."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from snella.training.norm import batchnorm_state, set_train_mode


def convnet() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 1),
                        nn.BatchNorm2d(4))
    with torch.no_grad():  # "pretrained" statistics, not torch's zeros and ones
        for bn in (net[1], net[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return net


def test_frozen_normalises_with_the_running_statistics_and_keeps_them():
    net = convnet()
    before = {k: v.clone() for k, v in batchnorm_state(net).items()}
    x = torch.randn(16, 3, 10, 10) * 3 + 1
    set_train_mode(net, "frozen")
    assert net.training and net[3].training  # dropout still trains
    assert not net[1].training and not net[5].training
    h = net[0](x)
    out = net[1](h)
    bn = net[1]
    # transcribed: (h - running_mean) / sqrt(running_var + eps) * weight + bias
    expected = ((h - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                * bn.weight[:, None, None] + bn.bias[:, None, None])
    torch.testing.assert_close(out, expected)
    net(x)
    for k, v in batchnorm_state(net).items():
        assert torch.equal(v, before[k]), k


def test_update_moves_the_running_mean_by_the_momentum_rule():
    net = convnet()
    old = net[1].running_mean.clone()
    x = torch.randn(16, 3, 10, 10) * 3 + 1
    set_train_mode(net, "update")
    assert net[1].training
    h = net[0](x)
    net[1](h)
    batch_mean = h.mean(dim=(0, 2, 3))
    torch.testing.assert_close(net[1].running_mean, 0.9 * old + 0.1 * batch_mean)


def test_frozen_statistics_still_let_the_affine_weights_train():
    net = convnet()
    set_train_mode(net, "frozen")
    net(torch.randn(4, 3, 10, 10)).square().mean().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0


def test_an_unknown_mode_is_refused_with_the_accepted_values():
    with pytest.raises(ValueError, match=r"bn_stats='eval'.*frozen, update"):
        set_train_mode(convnet(), "eval")


@pytest.mark.parametrize("mode", ["frozen", "update"])
def test_a_finished_run_rebuilds_with_the_statistics_it_was_trained_with(tmp_path: Path, mode: str):
    """LoRA on a timm ResNet: evaluate() of the saved run gives the run's own test accuracy, and the merged
    file holds the pretrained statistics ('frozen') or the re-estimated ones ('update')."""
    from safetensors.torch import load_file

    from snella.train import finetune
    from snella.training.config import TrainConfig
    from snella.training.tools import evaluate, merge

    out = tmp_path / "run"
    config = TrainConfig(model="resnet10t", data="mnist5k", train_limit=64, test_limit=64, epochs=1, batch_size=32,
                         warmup_epochs=0, method="lora", lr=1e-3, progress=False, output_dir=str(out),
                         transform="vtab", image_size=32, bn_stats=mode, target_modules=["conv2"])
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = finetune(config)
        merge(str(out), str(tmp_path / "merged.safetensors"))
    assert evaluate(str(out), limit=64)["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    merged = load_file(str(tmp_path / "merged.safetensors"))
    means = [v for k, v in merged.items() if k.endswith("running_mean")]
    assert len(means) == 14  # resnet10t: stem 3 + 4 blocks x 2 + 3 downsample BNs
    # the random-init backbone's statistics are torch's zeros: kept by 'frozen', replaced by 'update'
    moved = sum(bool(m.abs().max() > 1e-3) for m in means)
    assert moved == (0 if mode == "frozen" else 14)


def test_frozen_leaves_the_batchnorms_of_a_new_decoder_updating_their_statistics():
    """An smp UNet on a timm ResNet: the encoder's BatchNorms stay frozen, the newly initialised decoder's (trained in
    full, running stats still the init's 0 / 1) estimate theirs from the batches."""
    from snella.segmentation.models import build_segmentation_model
    from snella.training.norm import batchnorm_modules, mark_trained_in_full, trained_in_full_batchnorms

    torch.manual_seed(0)
    spec = build_segmentation_model("resnet18", 1, decoder="unet")
    model = spec.model
    tagged = mark_trained_in_full(model, spec.modules_to_save)
    decoder_bns = batchnorm_modules(model.get_submodule("model.decoder"))
    encoder_bns = batchnorm_modules(model.get_submodule("model.encoder"))
    assert tagged == len(decoder_bns) > 0 and len(encoder_bns) > 0
    assert {id(m) for m in trained_in_full_batchnorms(model)} == {id(m) for m in decoder_bns}
    set_train_mode(model, "frozen")
    assert all(m.training for m in decoder_bns) and not any(m.training for m in encoder_bns)
    encoder_before = encoder_bns[0].running_mean.clone()
    assert torch.equal(decoder_bns[0].running_var, torch.ones_like(decoder_bns[0].running_var))  # the init's
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2 + 1)
    assert torch.equal(encoder_bns[0].running_mean, encoder_before)  # pretrained statistics kept
    assert not torch.equal(decoder_bns[0].running_var, torch.ones_like(decoder_bns[0].running_var))  # estimated
    set_train_mode(model, "update")
    assert all(m.training for m in encoder_bns)
