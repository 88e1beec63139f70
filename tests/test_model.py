"""Tests of SnellaModel's contract: merge/unmerge/unload, disable, what trains, adapters by name, save/load."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from snella import SnellaConfig, SnellaModel, get_snella_model
from snella.functional import KERNELS
from snella.layer import SnellaConv2d, SnellaLayer, SnellaLinear
from snella.model import WEIGHTS_NAME

FAMILIES = ("vit", "swin", "convnext", "mobilenet", "eva", "hf_vit")
# The classifier of each tiny model, trained in full as a new head would be.
HEAD = {"vit": "head", "swin": "head.fc", "convnext": "head.fc", "mobilenet": "classifier", "eva": "head",
        "hf_vit": "classifier"}


def train_mode(family: str) -> bool:
    """Train in train mode, except BatchNorm nets: their running statistics would move, and the base
    model they are compared with would no longer be the same model."""
    return family != "mobilenet"


def assert_differs(y: torch.Tensor, y_base: torch.Tensor) -> None:
    """The adapter does something: a change of at least 2% of the output's scale (and 1e-3)."""
    diff = (y - y_base).abs().max().item()
    assert diff > max(1e-3, 0.02 * y_base.abs().max().item()), f"adapter changed the output by only {diff:.3g}"


def trained(tiny, family: str, steps: int = 3, **config):
    """(deepcopy of the base made before wrapping, wrapped model trained a few steps, input)."""
    model = tiny.model(family)
    base = copy.deepcopy(model)
    x = tiny.inputs(family)
    wrapped = get_snella_model(model, SnellaConfig(**{"r": 8, **config}))
    tiny.train(wrapped, x, steps=steps, train_mode=train_mode(family))
    return base, wrapped, x


# ---------------------------------------------------------------- merge / unmerge / unload


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_unmerged_and_unloaded_outputs_agree(tiny, family):
    base, wrapped, x = trained(tiny, family, sparsity=0.5, modules_to_save=[HEAD[family]])
    with torch.no_grad():
        y_base = tiny.logits(base, x)
        y_unmerged = tiny.logits(wrapped, x)
        assert_differs(y_unmerged, y_base)

        wrapped.merge_adapter()
        assert wrapped.merged_adapters() == ["default"]
        y_merged = tiny.logits(wrapped, x)
        torch.testing.assert_close(y_merged, y_unmerged, atol=1e-4, rtol=0)
        assert_differs(y_merged, y_base)

        weights = {n: p.clone() for n, p in wrapped.named_parameters() if n.endswith("base_layer.weight")}
        with pytest.warns(UserWarning, match="already merged"):
            wrapped.merge_adapter()  # a second merge must not add the update twice
        assert all(torch.equal(p, weights[n]) for n, p in wrapped.named_parameters() if n in weights)
        torch.testing.assert_close(tiny.logits(wrapped, x), y_merged, atol=0, rtol=0)

        wrapped.unmerge_adapter()
        assert wrapped.merged_adapters() == []
        torch.testing.assert_close(tiny.logits(wrapped, x), y_unmerged, atol=1e-4, rtol=0)

        adapted = list(wrapped.snella_layers())
        plain = wrapped.merge_and_unload()
        assert not any(isinstance(m, (SnellaLayer,)) for m in plain.modules())
        for name in adapted:  # the original layer types are back, so snella is not needed to run it
            assert type(plain.get_submodule(name)) is type(base.get_submodule(name))
        assert set(plain.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(tiny.logits(plain, x), y_unmerged, atol=1e-4, rtol=0)


def test_unload_returns_the_base_model(tiny):
    base, wrapped, x = trained(tiny, "vit", sparsity=0.3, modules_to_save=["head"])
    wrapped.merge_adapter()
    original = wrapped.unload()  # unmerges first, drops the head copy
    assert set(original.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(original(x), base(x), atol=1e-5, rtol=0)
    # every weight is back to the base's, up to the rounding of W0 + dW - dW
    for name, value in base.state_dict().items():
        torch.testing.assert_close(original.state_dict()[name], value, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- disable_adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapter_gives_the_base_model(tiny, family):
    base, wrapped, x = trained(tiny, family, sparsity=0.5, modules_to_save=[HEAD[family]])
    with torch.no_grad():
        y_base = tiny.logits(base, x)
        y_adapted = tiny.logits(wrapped, x)
        assert_differs(y_adapted, y_base)
        with wrapped.disable_adapter():
            # Unmerged, the base layers and the original head run on the untouched weights: bit-exact.
            assert torch.equal(tiny.logits(wrapped, x), y_base)
        torch.testing.assert_close(tiny.logits(wrapped, x), y_adapted, atol=0, rtol=0)

        wrapped.merge_adapter()
        with wrapped.disable_adapter():
            # Merged, disabling unmerges: W0 + dW - dW is W0 up to float rounding, not bit for bit.
            torch.testing.assert_close(tiny.logits(wrapped, x), y_base, atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny.logits(wrapped, x), y_adapted, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- what trains


@pytest.mark.parametrize("family, head, param", [("vit", "head", "cls_token"),
                                                 ("mobilenet", "classifier", None),
                                                 ("hf_vit", "classifier", "vit.embeddings.cls_token")])
def test_only_adapter_parameters_train(tiny, snapshot, family, head, param):
    model = tiny.model(family)
    x = tiny.inputs(family)
    config = SnellaConfig(r=8, sparsity=0.4, modules_to_save=[head], parameters_to_save=[param] if param else None)
    wrapped = get_snella_model(model, config)

    def allowed(name: str) -> bool:
        return (".snella_" in name or name.startswith(f"base_model.{head}.modules_to_save.default.")
                or name == f"base_model.{param}")

    names = [n for n, _ in wrapped.named_parameters()]
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == {n for n in names if allowed(n)}
    before = snapshot(wrapped)
    tiny.train(wrapped, x, steps=2, train_mode=train_mode(family))
    changed = {n for n, p in wrapped.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in names if allowed(n)}  # every trainable one moved, nothing else did
    assert any(".snella_alpha." in n for n in changed) and any(f"{head}.original_module." in n for n in names)


def test_print_trainable_parameters_counts_r_times_in_plus_out(tiny, capsys):
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=8))
    wrapped.print_trainable_parameters()
    d = 48  # embed dim of the tiny ViT; qkv is split into three (d, d) matrices, fc1 is (4d, d)
    per_block = 3 * 8 * (d + d) + 8 * (d + d) + 2 * 8 * (d + 4 * d) + 6 * 3  # + alpha, gamma, beta per matrix
    total = sum(p.numel() for p in wrapped.parameters())
    out = capsys.readouterr().out
    assert f"trainable params: {2 * per_block:,d} || all params: {total:,d}" in out
    assert wrapped.get_nb_trainable_parameters() == (2 * per_block, total)


# ---------------------------------------------------------------- adapters by name


def test_add_set_and_delete_adapters(tiny):
    model = tiny.model("vit")
    x = tiny.inputs("vit")
    wrapped = get_snella_model(model, SnellaConfig(r=8, sparsity=0.3, modules_to_save=["head"]))
    tiny.train(wrapped, x, steps=2)
    layers_before = list(wrapped.snella_layers())
    torch.manual_seed(5)
    wrapped.add_adapter("second", SnellaConfig(r=4, kernel="piecewise", sparsity=0.6, modules_to_save=["head"]))
    assert list(wrapped.snella_layers()) == layers_before  # adapted again in place, not wrapped twice
    assert wrapped.active_adapter == "default"
    with torch.no_grad():
        y_default = wrapped(x)
    wrapped.set_adapter("second")
    tiny.train(wrapped, x, steps=2)
    with torch.no_grad():
        y_second = wrapped(x)
    assert not torch.allclose(y_default, y_second, atol=1e-3)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)

    with torch.no_grad():
        wrapped.set_adapter("default")
        assert torch.equal(wrapped(x), y_default)
        wrapped.set_adapter("second")
        assert torch.equal(wrapped(x), y_second)

        wrapped.merge_adapter()
        with pytest.raises(ValueError, match="unmerge"):
            wrapped.set_adapter("default")
        wrapped.unmerge_adapter()
        with pytest.raises(ValueError, match="'nope'"):
            wrapped.set_adapter("nope")

        wrapped.delete_adapter("second")
        assert wrapped.active_adapter == "default"
        assert not any("second" in n for n in wrapped.state_dict())
        # "second" was merged and unmerged: the base weights carry W0 + dW - dW's rounding
        torch.testing.assert_close(wrapped(x), y_default, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- save / load


def sparsities(wrapped: SnellaModel, adapter: str | None = None) -> dict[str, float]:
    return {m.name: m.get_sparsity() for m in wrapped.matrices(adapter)}


@pytest.mark.parametrize("family", ["vit", "mobilenet"])
def test_save_load_round_trip(tiny, tmp_path, family):
    model = tiny.model(family)
    x = tiny.inputs(family)
    config = SnellaConfig(r=8, sparsity=0.5, modules_to_save=[HEAD[family]])
    wrapped = get_snella_model(model, config)
    tiny.train(wrapped, x, steps=2, train_mode=train_mode(family))
    for i, matrix in enumerate(wrapped.matrices()):  # as the budget allocator would leave them
        matrix.set_sparsity(0.05 + 0.9 * i / len(wrapped.matrices()))
    saved_levels = sparsities(wrapped)
    assert len(set(saved_levels.values())) == len(saved_levels)
    with torch.no_grad():
        y_saved = tiny.logits(wrapped, x)
    wrapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8

    loaded = SnellaModel.from_pretrained(tiny.model(family), tmp_path)  # a fresh base, same seed
    assert sparsities(loaded) == saved_levels
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(tiny.logits(loaded, x), y_saved)

    trainable = SnellaModel.from_pretrained(tiny.model(family), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
           {n for n, p in wrapped.named_parameters() if p.requires_grad}


def test_load_adapter_under_another_name(tiny, tmp_path):
    x = tiny.inputs("vit")
    source = get_snella_model(tiny.model("vit"), SnellaConfig(r=8, sparsity=0.4, modules_to_save=["head"]))
    tiny.train(source, x, steps=2)
    source.matrices()[0].set_sparsity(0.9)
    source.save_pretrained(tmp_path)
    with torch.no_grad():
        y_source = source(x)

    torch.manual_seed(42)  # another init for the target's own adapter
    target = get_snella_model(tiny.model("vit"), SnellaConfig(r=4, sparsity=0.2, modules_to_save=["head"]))
    tiny.train(target, x, steps=2)
    with torch.no_grad():
        y_own = target(x)
        assert not torch.allclose(y_own, y_source, atol=1e-3)
        target.load_adapter(tmp_path, adapter_name="task2")
        assert target.active_adapter == "task2"
        assert sparsities(target, "task2") == sparsities(source)
        assert torch.equal(target(x), y_source)
        target.set_adapter("default")
        assert torch.equal(target(x), y_own)
        target.set_adapter("task2")
        assert torch.equal(target(x), y_source)


def test_load_with_other_rank_names_key_and_shapes(tiny, tmp_path):
    get_snella_model(tiny.model("vit"), SnellaConfig(r=8)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"r": 8', '"r": 16'))
    with pytest.raises(ValueError) as err:
        SnellaModel.from_pretrained(tiny.model("vit"), tmp_path)
    message = str(err.value)
    assert "blocks.0.attn.qkv.snella_A" in message
    assert "(3, 2, 48, 4)" in message and "(3, 2, 48, 8)" in message  # the file's and the model's

    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=8))
    with pytest.raises(ValueError, match=re.escape("(3, 2, 48, 4)")):
        wrapped.load_adapter(tmp_path, adapter_name="other")
    assert list(wrapped.peft_config) == ["default"]  # the failed load left nothing behind


def test_load_from_missing_or_broken_files(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        SnellaModel.from_pretrained(tiny.model("vit"), tmp_path / "nowhere")
    get_snella_model(tiny.model("vit"), SnellaConfig(r=4)).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        SnellaModel.from_pretrained(tiny.model("vit"), tmp_path)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        get_snella_model(tiny.model("vit"), SnellaConfig(r=4)).load_adapter(tmp_path, "x")

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "lora_alpha": 16}))
    with pytest.raises(ValueError, match="lora_alpha"):
        SnellaModel.from_pretrained(tiny.model("vit"), tmp_path)


def test_vit_base_adapter_file_holds_only_the_adapter(tmp_path):
    """A real-size ViT-B/16: the adapter file is factors, scalars, sparsities and the head: ~7% of the model."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes > 300e6  # 86.6M fp32 parameters, ~344 MB
    wrapped = get_snella_model(model, SnellaConfig(r=32, modules_to_save=["head"]))
    wrapped.save_pretrained(tmp_path)

    file_bytes = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert file_bytes < 25e6
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    expected = {"head.weight", "head.bias"}
    for block in range(12):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for attr in ("A", "B", "alpha", "gamma", "beta", "sparsity"):
                expected.add(f"blocks.{block}.{layer}.snella_{attr}")
    assert keys == expected
    assert "blocks.0.attn.qkv.weight" not in keys
    # 72 matrices of r * (in + out) fp32 factors, plus the 1000-way head
    factors = 12 * (4 * 32 * (768 + 768) + 2 * 32 * (768 + 3072))
    assert file_bytes == pytest.approx(4 * (factors + 769_000), rel=0.01)


# ---------------------------------------------------------------- fused qkv split


def test_timm_qkv_is_split_into_q_k_v_with_their_own_sparsity(tiny):
    pattern = {r".*qkv\.k": 0.5, r".*qkv\.v": 0.75, r"blocks\.1\.mlp\..*": 0.25}
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=8, chunks=2, sparsity=0.1,
                                                              sparsity_pattern=pattern))
    qkv = wrapped.base_model.blocks[0].attn.qkv
    assert tuple(qkv.snella_A["default"].shape) == (3, 2, 48, 4)  # (S, P, d, r/P)
    assert tuple(qkv.snella_B["default"].shape) == (3, 2, 48, 4)
    assert tuple(qkv.snella_alpha["default"].shape) == (3,)
    expected = {}
    for b in range(2):
        fc = 0.25 if b == 1 else 0.1
        expected.update({f"blocks.{b}.attn.qkv.q": 0.1, f"blocks.{b}.attn.qkv.k": 0.5,
                         f"blocks.{b}.attn.qkv.v": 0.75, f"blocks.{b}.attn.proj": 0.1,
                         f"blocks.{b}.mlp.fc1": fc, f"blocks.{b}.mlp.fc2": fc})
    assert sparsities(wrapped) == expected
    # each third of the qkv update is sparsified on its own, to exactly its own level
    with torch.no_grad():
        delta = qkv.get_delta_weight("default")  # (3d, d)
    for part, level in zip(delta.chunk(3), (0.1, 0.5, 0.75)):
        n = part.numel()
        assert int((part == 0).sum()) == math.floor(level * (n - 1)) + 1


def test_split_qkv_false_keeps_one_matrix(tiny):
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=8, split_qkv=False, sparsity=0.3))
    qkv = wrapped.base_model.blocks[0].attn.qkv
    assert tuple(qkv.snella_A["default"].shape) == (1, 2, 48, 4)
    assert tuple(qkv.snella_B["default"].shape) == (1, 2, 144, 4)
    names = [m.name for m in wrapped.matrices()]
    assert "blocks.0.attn.qkv" in names and not any(n.endswith(".q") for n in names)
    with torch.no_grad():
        delta = qkv.get_delta_weight("default")
    assert int((delta == 0).sum()) == math.floor(0.3 * (delta.numel() - 1)) + 1  # one competition over all


# ---------------------------------------------------------------- kernels, competition, dtypes


@pytest.mark.parametrize("competition", ["magnitude", "soft"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_and_competition_trains_and_merges(tiny, kernel, competition):
    base, wrapped, x = trained(tiny, "vit", steps=3, kernel=kernel, competition=competition, sparsity=0.5)
    with torch.no_grad():
        y_base, y = base(x), wrapped(x)
        assert torch.isfinite(y).all()
        assert_differs(y, y_base)
        wrapped.merge_adapter()
        torch.testing.assert_close(wrapped(x), y, atol=1e-4, rtol=0)


def test_linear_kernel_without_competition_is_lora(tiny):
    model = tiny.model("vit")
    base = copy.deepcopy(model)
    x = tiny.inputs("vit")
    wrapped = get_snella_model(model, SnellaConfig(r=8, chunks=2, kernel="linear", sparsity=0.0, competition="none"))
    tiny.train(wrapped, x, steps=1)
    merged = copy.deepcopy(base)
    for name, layer in wrapped.snella_layers().items():
        A, B = layer.snella_A["default"].detach(), layer.snella_B["default"].detach()  # (S, P, n, r/P)
        # LoRA's B A^T with the chunks side by side as rank dimensions, one matrix per q/k/v
        hand = torch.cat([torch.cat(list(B[s]), dim=-1) @ torch.cat(list(A[s]), dim=-1).T
                          for s in range(A.shape[0])])  # (out, in)
        torch.testing.assert_close(layer.get_delta_weight("default"), hand, atol=0, rtol=0)
        merged.get_submodule(name).weight.data += hand
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), merged(x), atol=1e-5, rtol=0)
        assert_differs(wrapped(x), base(x))


def test_bf16_model_trains_and_keeps_exact_sparsity(tiny, tmp_path):
    model = tiny.model("vit")
    x = tiny.inputs("vit")
    wrapped = get_snella_model(model, SnellaConfig(r=8, sparsity=0.8))
    tiny.train(wrapped, x, steps=2)
    with torch.no_grad():
        y_fp32 = wrapped(x)
    wrapped.to(torch.bfloat16)
    layer = wrapped.base_model.blocks[0].attn.qkv
    assert layer.snella_A["default"].dtype == torch.bfloat16
    assert layer.sparsity["default"] == [0.8, 0.8, 0.8]  # exact Python floats, not bf16's 0.80078125
    assert all(m.get_sparsity() == 0.8 for m in wrapped.matrices())

    wrapped.train()
    y = wrapped(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_fp32, atol=0.05 * y_fp32.abs().max().item(), rtol=0)
    y.float().pow(2).mean().backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if ".snella_" in n]
    assert grads and all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads if g.dim() > 1)

    wrapped.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    assert saved["blocks.0.attn.qkv.snella_sparsity"].tolist() == [0.8, 0.8, 0.8]
    assert wrapped.state_dict()["base_model.blocks.0.attn.qkv._extra_state"]["sparsity"]["default"] == [0.8] * 3


# ---------------------------------------------------------------- layers that are read, not called


def test_eva_reads_the_adapted_qkv_weight(tiny):
    """timm's EVA passes ``attn.qkv.weight`` to F.linear itself: the adapter must act through it."""
    model = tiny.model("eva")
    base = copy.deepcopy(model)
    x = tiny.inputs("eva")
    wrapped = get_snella_model(model, SnellaConfig(r=8, target_modules=["attn.qkv"]))
    tiny.train(wrapped, x, steps=5, lr=5e-2)  # the authors' update K' |K'| starts ~1e-5: train it until it shows
    qkv = wrapped.base_model.blocks[0].attn.qkv
    assert isinstance(qkv, SnellaLinear)
    assert qkv.snella_A["default"].grad is not None and qkv.snella_A["default"].grad.abs().sum() > 0
    with torch.no_grad():
        y = wrapped(x)
        assert_differs(y, base(x))
        wrapped.merge_adapter()
        torch.testing.assert_close(wrapped(x), y, atol=1e-4, rtol=0)


def test_wrapped_layer_types(tiny):
    wrapped = get_snella_model(tiny.model("mobilenet"), SnellaConfig(r=4))
    layers = wrapped.snella_layers()
    assert layers and all(isinstance(m, SnellaConv2d) for m in layers.values())
    assert all(isinstance(m.base_layer, nn.Conv2d) for m in layers.values())
    wrapped = get_snella_model(tiny.model("swin"), SnellaConfig(r=4))
    assert all(isinstance(m, SnellaLinear) for m in wrapped.snella_layers().values())


def test_adapter_dropout_skips_the_attention_output_projection(tiny):
    """The authors put adapter dropout on q, k, v, fc1 and fc2, not on attn.proj."""
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=4, adapter_dropout=0.1))
    kinds = {name: type(layer.snella_dropout["default"]).__name__ for name, layer in wrapped.snella_layers().items()}
    assert kinds == {f"blocks.{i}.{m}": ("Identity" if m == "attn.proj" else "Dropout")
                     for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    proj = wrapped.base_model.blocks[0].attn.proj.train()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        y_train = proj(x)
        assert torch.equal(y_train, proj.eval()(x))  # no dropout on proj: training output is deterministic
    everywhere = get_snella_model(tiny.model("vit"), SnellaConfig(r=4, adapter_dropout=0.1, adapter_dropout_exclude=None))
    assert all(isinstance(layer.snella_dropout["default"], nn.Dropout) for layer in everywhere.snella_layers().values())


# ---------------------------------------------------------------- the adapter contract (as peft states it)


def structure(model: nn.Module) -> list[tuple[str, type, bool]]:
    """Every module's name, type and train/eval mode."""
    return [(n, type(m), m.training) for n, m in model.named_modules()]


def flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_a_saved_module_is_trained_in_full_not_adapted(tiny, tmp_path):
    """A module both targeted and in modules_to_save is only saved (peft: modules_to_save wins)."""
    base, wrapped, x = trained(tiny, "vit", sparsity=0.3, target_modules=["qkv", "head"], modules_to_save=["head"])
    head = wrapped.base_model.head
    assert type(head.original_module) is nn.Linear and type(head.modules_to_save["default"]) is nn.Linear
    assert sorted(wrapped.snella_layers()) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad and ".snella_" not in n} == \
           {"base_model.head.modules_to_save.default.weight", "base_model.head.modules_to_save.default.bias"}
    with torch.no_grad():
        y = wrapped(x)
        assert_differs(y, base(x))
    wrapped.save_pretrained(tmp_path)
    assert {k for k in load_file(str(tmp_path / WEIGHTS_NAME)) if k.startswith("head")} == {"head.weight", "head.bias"}
    loaded = SnellaModel.from_pretrained(tiny.model("vit"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
        plain = wrapped.merge_and_unload()
        assert type(plain.head) is nn.Linear and set(plain.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(plain(x), y, atol=1e-5, rtol=0)

    # what is inside a saved module is not adapted either
    inside = get_snella_model(tiny.model("vit"), SnellaConfig(r=4, modules_to_save=["blocks.1"]))
    assert sorted(inside.snella_layers()) == [f"blocks.0.{n}" for n in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")]


def test_targeting_only_saved_modules_is_an_error(tiny):
    model = tiny.model("vit")
    before = structure(model)
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\].*trained in full"):
        get_snella_model(model, SnellaConfig(r=4, target_modules=["head"], modules_to_save=["head"]))
    assert structure(model) == before
    wrapped = get_snella_model(model, SnellaConfig(r=4, target_modules=["fc1"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\]"):  # head already holds a saved copy
        wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["head"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="'head' is a ModulesToSaveWrapper"):  # saved by "default", not by "second"
        wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["head"], modules_to_save=["norm"]))
    with pytest.raises(ValueError, match=r"'blocks.0.mlp'.*blocks.0.mlp.fc1"):  # adapted by "default"
        wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["qkv"], modules_to_save=["blocks.0.mlp"]))
    assert list(wrapped.peft_config) == ["default"]


class FailOnThirdLayer:
    """An ``update_layer`` that fails on its third call, after two layers were adapted."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = SnellaLayer.update_layer

        def update_layer(layer, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("out of memory (simulated)")
            return original(layer, *args, **kwargs)

        monkeypatch.setattr(SnellaLayer, "update_layer", update_layer)


BAD_CONFIGS = {
    "modules_to_save typo": (dict(modules_to_save=["haed"]), ValueError, "'haed'"),
    "parameters_to_save typo": (dict(modules_to_save=["head"], parameters_to_save=["cls_tokn"]), ValueError,
                                "'cls_tokn'"),
    "failure while injecting": (dict(modules_to_save=["head"]), RuntimeError, "simulated"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_failed_get_snella_model_leaves_the_model_as_it_was(tiny, monkeypatch, case):
    config, error, message = BAD_CONFIGS[case]
    model = tiny.model("vit")
    x = tiny.inputs("vit")
    state, before, grads = copy.deepcopy(model.state_dict()), structure(model), flags(model)
    with torch.no_grad():
        y = model(x)
    if error is RuntimeError:
        FailOnThirdLayer(monkeypatch)
    with pytest.raises(error, match=message):
        get_snella_model(model, SnellaConfig(r=4, **config))
    assert structure(model) == before and flags(model) == grads
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), y)


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_failed_add_adapter_leaves_the_existing_adapter_and_no_trace(tiny, monkeypatch, case):
    config, error, message = BAD_CONFIGS[case]
    x = tiny.inputs("vit")
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=4, sparsity=0.3, target_modules=["qkv"]))
    tiny.train(wrapped, x, steps=2)
    state, before, grads = copy.deepcopy(wrapped.state_dict()), structure(wrapped), flags(wrapped)
    with torch.no_grad():
        y = wrapped(x)
    if error is RuntimeError:
        FailOnThirdLayer(monkeypatch)
    with pytest.raises(error, match=message):  # targets fc1 too: new wrappers, then the failure
        wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["qkv", "fc1"], **config))
    assert list(wrapped.peft_config) == ["default"]
    assert all(list(layer.adapter_config) == ["default"] for layer in wrapped.snella_layers().values())
    assert structure(wrapped) == before and flags(wrapped) == grads
    assert set(wrapped.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in wrapped.state_dict().items() if not k.endswith("_extra_state"))
    with torch.no_grad():
        assert torch.equal(wrapped(x), y)
    monkeypatch.undo()
    wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["qkv", "fc1"], modules_to_save=["head"]))
    assert sorted(wrapped.peft_config) == ["default", "second"]


def test_failed_load_leaves_the_model_as_it_was(tiny, tmp_path):
    x = tiny.inputs("vit")
    get_snella_model(tiny.model("vit"), SnellaConfig(r=8, modules_to_save=["head"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"r": 8', '"r": 16'))  # the file no longer fits
    model = tiny.model("vit")
    before = structure(model)
    with pytest.raises(ValueError, match="shape mismatch"):
        SnellaModel.from_pretrained(model, tmp_path)
    assert structure(model) == before

    wrapped = get_snella_model(model, SnellaConfig(r=4, target_modules=["qkv"]))
    before, grads = structure(wrapped), flags(wrapped)
    with torch.no_grad():
        y = wrapped(x)
    with pytest.raises(ValueError, match="shape mismatch"):
        wrapped.load_adapter(tmp_path, adapter_name="other")
    assert structure(wrapped) == before and flags(wrapped) == grads and list(wrapped.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(wrapped(x), y)


def test_an_added_adapter_is_frozen_and_changes_nothing_that_runs(tiny, snapshot):
    x = tiny.inputs("vit")
    wrapped = get_snella_model(tiny.model("vit"), SnellaConfig(r=4, sparsity=0.3, target_modules=["qkv"]))
    tiny.train(wrapped, x, steps=2)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    with torch.no_grad():
        y = wrapped(x)
    # new layers (fc1) and a new head copy: none may run or train while "default" is active
    wrapped.add_adapter("second", SnellaConfig(r=4, target_modules=["qkv", "fc1"], modules_to_save=["head"]))
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == trainable
    assert wrapped.base_model.head.active_adapter == "default"
    assert all(layer.active_adapter == "default" for layer in wrapped.snella_layers().values())
    with torch.no_grad():
        assert torch.equal(wrapped(x), y)
    before = snapshot(wrapped)
    tiny.train(wrapped, x, steps=2)
    assert {n for n, p in wrapped.named_parameters() if not torch.equal(p, before[n])} == trainable

    wrapped.set_adapter("second")
    second = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert second and all(".second" in n for n in second)
    assert "base_model.head.modules_to_save.second.weight" in second
    assert any(".mlp.fc1.snella_A.second" in n for n in second)


def test_deleting_the_last_adapter_leaves_none_active(tiny, tmp_path):
    base, wrapped, x = trained(tiny, "vit", sparsity=0.3, modules_to_save=["head"])
    wrapped.merge_adapter()
    with pytest.raises(ValueError, match="'default' is merged; unmerge"):
        wrapped.delete_adapter("default")
    wrapped.unmerge_adapter()
    wrapped.delete_adapter("default")
    assert wrapped.active_adapter is None and wrapped.peft_config == {}
    assert all(m.active_adapter is None for m in wrapped.base_model.modules() if hasattr(m, "active_adapter"))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), base(x), atol=1e-5, rtol=0)  # W0 + dW - dW rounding
    for call in (lambda: wrapped.save_pretrained(tmp_path), wrapped.merge_adapter, wrapped.merge_and_unload,
                 wrapped.matrices):
        with pytest.raises(ValueError, match="no adapter is active.*add one"):
            call()
    assert not (tmp_path / WEIGHTS_NAME).exists()

    wrapped.add_adapter("new", SnellaConfig(r=4))  # with none active, the new one becomes active
    assert wrapped.active_adapter == "new"
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == \
           {n for n, _ in wrapped.named_parameters() if ".snella_" in n}
    plain = wrapped.unload()
    assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wrapping_and_loading_keep_or_set_the_mode_as_peft(tiny, tmp_path, mode):
    """Adapted layers take the model's mode; loading for inference puts it in eval mode, as peft does."""
    x = tiny.inputs("vit")
    wrapped = get_snella_model(tiny.model("vit").train(mode == "train"),
                               SnellaConfig(r=4, adapter_dropout=0.5, modules_to_save=["head"]))
    assert {m.training for m in wrapped.base_model.modules()} == {mode == "train"}
    if mode == "eval":  # eval means no dropout on the adapter branch either: the same output twice
        with torch.no_grad():
            assert torch.equal(wrapped(x), wrapped(x))
    wrapped.save_pretrained(tmp_path)
    model = tiny.model("vit").train(mode == "train")
    model.head = nn.Sequential(nn.Dropout(0.1).train(mode != "train"), model.head)  # a mixed-mode module
    get_snella_model(model, SnellaConfig(r=4, modules_to_save=["head"]))
    assert model.head.original_module[0].training == (mode != "train")  # wrapping kept the modes inside it

    for is_trainable in (False, True):
        loaded = SnellaModel.from_pretrained(tiny.model("vit").train(mode == "train"), tmp_path,
                                             is_trainable=is_trainable)
        expected = {mode == "train"} if is_trainable else {False}
        assert {m.training for m in loaded.base_model.modules()} == expected
        target = get_snella_model(tiny.model("vit").train(mode == "train"), SnellaConfig(r=4))
        target.load_adapter(tmp_path, adapter_name="loaded", is_trainable=is_trainable)
        assert {m.training for m in target.base_model.modules()} == expected
        assert any(p.requires_grad for p in target.parameters()) == is_trainable


def test_hooks_on_a_wrapped_base_layer_see_the_adapted_features(tiny):
    """Feature extraction with a hook on ``layer.base_layer``: the hook sees, and may change, what the layer gives."""
    _, wrapped, x = trained(tiny, "vit", sparsity=0.3)
    fc1 = wrapped.base_model.blocks[0].mlp.fc1
    features = {}
    handles = [fc1.register_forward_pre_hook(lambda m, args: features.__setitem__("input", args[0])),
               fc1.register_forward_hook(lambda m, args, out: features.__setitem__("layer", out)),
               fc1.base_layer.register_forward_hook(lambda m, args, out: features.__setitem__("base", out))]
    with torch.no_grad():
        y = wrapped(x)
        assert torch.equal(features["base"], features["layer"])
        assert_differs(features["base"], nn.functional.linear(features["input"], fc1.base_layer.weight,
                                                              fc1.base_layer.bias))  # not W0's features
    for handle in handles:
        handle.remove()
    fc1.base_layer.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    with torch.no_grad():
        assert not torch.equal(wrapped(x), y)  # a hook that replaces the output is honoured
        assert torch.equal(fc1(torch.ones(2, 48)), torch.zeros(2, 192))
