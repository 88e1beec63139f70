"""The EMA of the trainable parameters: the update rule against a hand computation, the swap for evaluation,
and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snella.training.ema import ParameterEMA, ema_decay_at


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[0].requires_grad_(False)  # a frozen layer is not averaged
    return net


def test_the_decay_warms_up_as_tensorflow_num_updates():
    assert ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(100000, 0.999) == 0.999
    assert ema_decay_at(1, 0.999, warmup=False) == 0.999


def test_update_follows_the_recurrence_on_trainable_parameters_only():
    net = model()
    ema = ParameterEMA(net, 0.9, warmup=False)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    w0 = net[1].weight.detach().clone()
    with torch.no_grad():
        net[1].weight.add_(1.0)
    ema.update(net)
    w1 = net[1].weight.detach().clone()
    with torch.no_grad():
        net[1].weight.mul_(-2.0)
    ema.update(net)
    w2 = net[1].weight.detach().clone()
    # transcribed: s1 = 0.9 s0 + 0.1 w1; s2 = 0.9 s1 + 0.1 w2
    expected = 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * w2
    torch.testing.assert_close(ema.shadow["1.weight"], expected)


def test_swapped_in_evaluates_the_average_and_gives_the_trained_weights_back():
    net = model()
    ema = ParameterEMA(net, 0.5, warmup=False)
    with torch.no_grad():
        net[1].weight.add_(2.0)
    ema.update(net)  # shadow = w0 + 1
    trained = net[1].weight.detach().clone()
    with ema.swapped_in(net):
        torch.testing.assert_close(net[1].weight, trained - 1.0)
    assert torch.equal(net[1].weight, trained)


def test_state_round_trip_and_refusals():
    net = model()
    ema = ParameterEMA(net, 0.99)
    ema.update(net)
    other = ParameterEMA(model(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and other.decay == 0.99
    assert torch.equal(other.shadow["1.bias"], ema.shadow["1.bias"])
    with pytest.raises(ValueError, match="does not fit"):
        ParameterEMA(nn.Linear(2, 2), 0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"ema_decay=1\.0.*\(0, 1\)"):
        ParameterEMA(net, 1.0)


# ---------------------------------------------------------------- in `snella finetune`

TINY = dict(model="vit_fmnist_d128", model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, data="mnist5k",
            train_limit=96, test_limit=64, epochs=2, batch_size=32, warmup_epochs=1, sparsity=0.5, lr=1e-2,
            progress=False)


def _run(tmp_path, name, **overrides):
    import contextlib
    import io

    from snella.train import finetune
    from snella.training.config import TrainConfig

    out = tmp_path / name
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = finetune(TrainConfig(**{**TINY, "output_dir": str(out), **overrides}))
    return metrics, out


def test_finetune_tests_and_saves_the_average(tmp_path):
    from safetensors.torch import load_file

    from snella.training.checkpoint import load_checkpoint
    from snella.training.tools import evaluate

    plain, plain_out = _run(tmp_path, "plain")
    forget, forget_out = _run(tmp_path, "forget", ema_decay=1e-9)  # an average that forgets at once
    slow, slow_out = _run(tmp_path, "slow", ema_decay=0.9)
    # the EMA never changes the training: same losses; forgetting at once is the last step's weights
    assert [r["train_loss"] for r in slow["history"]] == [r["train_loss"] for r in plain["history"]]
    a, b = load_file(str(plain_out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(forget_out / "adapter" / "adapter_model.safetensors"))
    c = load_file(str(slow_out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], c[k], atol=1e-4) for k in a if a[k].is_floating_point())
    # what was tested is what was saved
    assert evaluate(str(slow_out), limit=64)["accuracy"] == pytest.approx(slow["test_accuracy"], abs=1e-9)
    state = load_checkpoint(slow_out)
    assert state["ema"]["updates"] == slow["steps"] and state["ema"]["decay"] == 0.9


def test_a_bad_decay_names_the_setting():
    from snella.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"ema_decay=1\.5 is invalid; accepted: a number in \(0, 1\)"):
        TrainConfig(ema_decay=1.5)
