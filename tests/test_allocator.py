"""Tests of the layer-level competition: schedule, share-out, EMAs, and the allocator end to end."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from snella.allocator import (
    AllocatorConfig,
    BudgetAllocator,
    MatrixRef,
    budget_schedule,
    ema_update,
    layer_scores,
    sensitivity,
    share_out,
    sparsities_from_budgets,
)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures


class FakeModel:
    """Two fake adapted layers: a qkv layer holding q, k, v (8x8 each) and an fc1 (16x8)."""

    P, R = 2, 4

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        half = self.R // self.P
        self.qkv_a = torch.nn.Parameter(torch.randn(3, self.P, 8, half, generator=gen))   # (S, P, in, r/P)
        self.qkv_b = torch.nn.Parameter(torch.randn(3, self.P, 8, half, generator=gen))   # (S, P, out_s, r/P)
        self.fc1_a = torch.nn.Parameter(torch.randn(1, self.P, 8, half, generator=gen))
        self.fc1_b = torch.nn.Parameter(torch.randn(1, self.P, 16, half, generator=gen))
        self.sparsity: dict[str, float] = {}
        self.delta_scale: dict[str, float] = {}
        self.refs = [self._ref(f"blocks.0.attn.qkv.{n}", self.qkv_a, self.qkv_b, i, 64) for i, n in enumerate("qkv")]
        self.refs.append(self._ref("blocks.0.mlp.fc1", self.fc1_a, self.fc1_b, 0, 128))
        # per-matrix gradient scale: v gets the largest gradients, fc1 the smallest
        self.grad_scale = {"blocks.0.attn.qkv.q": 1.0, "blocks.0.attn.qkv.k": 2.0,
                           "blocks.0.attn.qkv.v": 3.0, "blocks.0.mlp.fc1": 0.5}

    def _ref(self, name: str, a: torch.nn.Parameter, b: torch.nn.Parameter, seg: int, numel: int) -> MatrixRef:
        self.delta_scale[name] = 1.0
        return MatrixRef(
            name=name, A=a, B=b, segment=seg, numel=numel,
            get_sparsity=lambda: self.sparsity[name],
            set_sparsity=lambda s: self.sparsity.__setitem__(name, s),
            delta=lambda: self.delta_scale[name] * torch.ones(numel // 8, 8),
        )

    def fake_grads(self, step: int) -> None:
        """Deterministic gradients per step, scaled per matrix."""
        gen = torch.Generator().manual_seed(1000 + step)
        for p in (self.qkv_a, self.qkv_b, self.fc1_a, self.fc1_b):
            p.grad = torch.randn(p.shape, generator=gen)
        for ref in self.refs:
            ref.A.grad[ref.segment] *= self.grad_scale[ref.name]
            ref.B.grad[ref.segment] *= self.grad_scale[ref.name]


def train(alloc: BudgetAllocator, model: FakeModel, first: int, last: int) -> list[int]:
    """Run optimizer steps first..last (fake); return the steps at which a reallocation happened."""
    moved = []
    for step in range(first, last + 1):
        model.fake_grads(step)
        alloc.update_scores()
        if alloc.step(step):
            moved.append(step)
    return moved


def kept(model: FakeModel) -> float:
    return sum((1 - model.sparsity[r.name]) * r.numel for r in model.refs)


# ---------------------------------------------------------------- pure functions


def test_budget_schedule_matches_cubic():
    assert budget_schedule(0, 10, 100.0, 20.0) == 100.0
    assert budget_schedule(5, 10, 100.0, 20.0) == pytest.approx(20 + 80 * 0.5**3, abs=1e-12)
    assert budget_schedule(10, 10, 100.0, 20.0) == 20.0
    # warm-up t_i = 2 and final t_f = 3 of T = 10: cubic over t in (2, 7)
    assert budget_schedule(1, 10, 100.0, 20.0, 2, 3) == 100.0
    assert budget_schedule(2, 10, 100.0, 20.0, 2, 3) == 100.0
    assert budget_schedule(4, 10, 100.0, 20.0, 2, 3) == pytest.approx(20 + 80 * (1 - 2 / 5) ** 3, abs=1e-12)
    assert budget_schedule(7, 10, 100.0, 20.0, 2, 3) == 20.0
    assert budget_schedule(9, 10, 100.0, 20.0, 2, 3) == 20.0
    with pytest.raises(ValueError, match="t_init"):
        budget_schedule(0, 3, 1.0, 0.5, 2, 2)


def test_share_out_proportional():
    assert share_out(100, [1, 2, 3, 4], [1000] * 4) == [10, 20, 30, 40]


def test_share_out_redistributes_when_capped():
    # 0.9 * 100 = 90 > 10 entries: the 80 left over go to the two others, equally by score
    assert share_out(100, [0.9, 0.05, 0.05], [10, 100, 100]) == [10, 45, 45]
    # and in proportion to the scores of those with room: 70 -> 10, then 60 shared 2:1
    assert share_out(100, [0.7, 0.2, 0.1], [10, 100, 100]) == [10, 60, 30]


def test_share_out_uniform_when_scores_zero():
    assert share_out(30, [0.0, 0.0, 0.0], [100, 100, 100]) == [10, 10, 10]
    assert share_out(31, torch.zeros(3), [100, 100, 100]) == [11, 10, 10]


def test_share_out_largest_remainder_and_zero_score_room():
    # 3.5, 2.1, 1.4: floors give 6, the last unit goes to the largest fraction
    assert share_out(7, [0.5, 0.3, 0.2], [100] * 3) == [4, 2, 1]
    # only a zero-score matrix has room: it still takes the rest so the total is met
    assert share_out(15, [1.0, 0.0], [10, 10]) == [10, 5]
    # more budget than entries: everything is kept
    assert share_out(1000, [0.3, 0.7], [10, 20]) == [10, 20]


def test_share_out_min_budget_lifts_starved_matrices():
    assert share_out(20, [1.0, 0.0, 0.0], [100] * 3) == [20, 0, 0]
    assert share_out(20, [1.0, 0.0, 0.0], [100] * 3, min_budget=1) == [18, 1, 1]
    with pytest.raises(ValueError, match="min_budget"):
        share_out(2, [1.0, 1.0, 1.0], [100] * 3, min_budget=1)


@pytest.mark.parametrize("seed", range(20))
def test_share_out_sum_exact_and_caps(seed):
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 40, (1,), generator=gen))
    numels = torch.randint(1, 5000, (count,), generator=gen).tolist()
    scores = torch.rand(count, generator=gen) ** 4  # skewed, so caps bind
    scores[torch.rand(count, generator=gen) < 0.2] = 0.0
    total = int(torch.randint(0, int(sum(numels) * 1.2) + 1, (1,), generator=gen))
    budgets = share_out(total, scores, numels)
    assert sum(budgets) == min(total, sum(numels))
    assert all(0 <= b <= n for b, n in zip(budgets, numels))
    if min(total, sum(numels)) >= count:
        budgets = share_out(total, scores, numels, min_budget=1)
        assert sum(budgets) == min(total, sum(numels))
        assert all(1 <= b <= n for b, n in zip(budgets, numels))


def test_share_out_rejects_bad_input():
    with pytest.raises(ValueError, match="scores"):
        share_out(10, [1.0, -0.5], [10, 10])
    with pytest.raises(ValueError, match="one score per matrix"):
        share_out(10, [1.0], [10, 10])
    with pytest.raises(ValueError, match="numels"):
        share_out(10, [1.0], [0])


def test_sparsities_from_budgets():
    assert sparsities_from_budgets([0, 5, 10], [10, 10, 10]) == [1.0, 0.5, 0.0]


def test_sensitivity_zeroes_non_finite():
    param = torch.tensor([1.0, -2.0, float("nan"), 1.0])
    grad = torch.tensor([3.0, 4.0, 1.0, float("inf")])
    assert sensitivity(param, grad).tolist() == [3.0, 8.0, 0.0, 0.0]


def test_ema_update_by_hand():
    i_bar, u_bar = ema_update(None, None, torch.tensor([1.0, 2.0]))
    assert i_bar.tolist() == pytest.approx([0.15, 0.3])
    assert u_bar.tolist() == pytest.approx([0.15 * 0.85, 0.15 * 1.7])
    i_bar, u_bar = ema_update(i_bar, u_bar, torch.tensor([3.0, 0.0]))
    # I_bar = 0.85 * [0.15, 0.3] + 0.15 * [3, 0];  U_bar = 0.85 * U_prev + 0.15 * |I - I_bar_new|
    assert i_bar.tolist() == pytest.approx([0.5775, 0.255])
    assert u_bar.tolist() == pytest.approx([0.108375 + 0.15 * 2.4225, 0.21675 + 0.15 * 0.255])


def test_layer_scores_by_hand():
    two = torch.tensor([2.0, 2.0])
    one = torch.ones(2)
    emas = [(one, two, one[:1], two[:1]), (one[:1], torch.tensor([4.0]), None, None)]
    assert layer_scores(emas).tolist() == pytest.approx([0.5, 0.5])
    zero = torch.zeros(2)
    assert layer_scores([(zero, zero, None, None)] * 4).tolist() == [0.25] * 4


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs, field", [
    ({"target_sparsity": 1.0}, "target_sparsity"),
    ({"target_sparsity": 0.5, "init_sparsity": 0.6}, "init_sparsity"),
    ({"target_sparsity": 0.5, "score": "norm"}, "score"),
    ({"target_sparsity": 0.5, "schedule": "weekly"}, "schedule"),
    ({"target_sparsity": 0.5, "schedule": "steps"}, "interval_steps"),
    ({"target_sparsity": 0.5, "interval_steps": 0}, "interval_steps"),
    ({"target_sparsity": 0.5, "beta1": 1.0}, "beta1"),
    ({"target_sparsity": 0.5, "adaptive_threshold": 0.0}, "adaptive_threshold"),
    ({"target_sparsity": 0.5, "warmup": -1}, "warmup"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AllocatorConfig(**kwargs)


def test_allocator_rejects_warmup_past_schedule():
    with pytest.raises(ValueError, match="warmup"):
        BudgetAllocator(FakeModel().refs, AllocatorConfig(0.5, warmup=2, final=2), 12, 3)  # T = 3


# ---------------------------------------------------------------- end to end


def test_epoch_schedule_end_to_end():
    model = FakeModel()
    cfg = AllocatorConfig(target_sparsity=0.8)
    epochs, per_epoch = 4, 3
    alloc = BudgetAllocator(model.refs, cfg, epochs * per_epoch, per_epoch)
    numel = sum(r.numel for r in model.refs)
    # the first epoch runs at the init sparsity, set at construction
    assert all(s == 0.01 for s in model.sparsity.values())
    assert all(d == pytest.approx(0.99) for d in alloc.history[0]["densities"].values())

    moved = train(alloc, model, 1, epochs * per_epoch)
    assert moved == [3, 6, 9]  # starts of epochs 1, 2, 3
    assert [h["epoch"] for h in alloc.history] == [0, 1, 2, 3]
    # budgets follow the cubic with T = E - 1 = 3, and end exactly at the target
    for h in alloc.history[1:]:
        expected = budget_schedule(h["t"], 3, 0.99 * numel, 0.2 * numel)
        assert h["budget"] == math.floor(expected + 0.5)
    assert alloc.history[-1]["budget"] == round(0.2 * numel) == alloc.current_budget()
    assert kept(model) == pytest.approx(0.2 * numel, abs=1e-6)
    # larger gradients, larger share (q, k, v have the same size)
    final = alloc.history[-1]["densities"]
    assert final["blocks.0.attn.qkv.q"] < final["blocks.0.attn.qkv.k"] < final["blocks.0.attn.qkv.v"]


def test_steps_schedule_last_interval_at_target():
    model = FakeModel()
    cfg = AllocatorConfig(target_sparsity=0.5, schedule="steps", interval_steps=3)
    alloc = BudgetAllocator(model.refs, cfg, total_steps=10, steps_per_epoch=5)  # T = ceil(10/3) - 1 = 3
    assert train(alloc, model, 1, 10) == [3, 6, 9]
    assert alloc.history[-1]["budget"] == 160 and alloc.history[-1]["epoch"] == 1


def test_single_epoch_uses_target_directly():
    model = FakeModel()
    alloc = BudgetAllocator(model.refs, AllocatorConfig(target_sparsity=0.75), 5, 5)
    assert all(s == 0.75 for s in model.sparsity.values())
    assert train(alloc, model, 1, 5) == []
    assert alloc.current_budget() == 80


def test_frobenius_score_follows_delta_norm():
    model = FakeModel()
    model.delta_scale["blocks.0.attn.qkv.k"] = 4.0
    alloc = BudgetAllocator(model.refs, AllocatorConfig(0.8, score="frobenius"), 4, 2)
    train(alloc, model, 1, 4)
    final = alloc.history[-1]["densities"]
    # ||delta||_F: q = v = 8, k = 32, fc1 = sqrt(128); budget 64 shared 8:32:8:11.3
    assert final["blocks.0.attn.qkv.k"] > final["blocks.0.attn.qkv.q"] == final["blocks.0.attn.qkv.v"]
    assert alloc.history[-1]["budget"] == 64


def test_adaptive_reallocates_only_when_moved():
    model = FakeModel()
    # same gradient pattern each step, so the normalised scores never move
    model.fake_grads = lambda step, f=model.fake_grads: f(0)
    cfg = AllocatorConfig(0.5, schedule="adaptive", interval_steps=10, adaptive_threshold=0.3)
    alloc = BudgetAllocator(model.refs, cfg, total_steps=50, steps_per_epoch=10)  # T = 4
    # t=1: first check (no scores yet); t=2, 3: budget within 30% of t=1's; t=4: target
    assert train(alloc, model, 1, 50) == [10, 40]
    assert alloc.current_budget() == 160


def test_adaptive_reallocates_when_scores_move():
    model = FakeModel()
    cfg = AllocatorConfig(0.5, schedule="adaptive", interval_steps=10, adaptive_threshold=0.3)
    alloc = BudgetAllocator(model.refs, cfg, total_steps=50, steps_per_epoch=10)
    train(alloc, model, 1, 10)
    model.grad_scale = {"blocks.0.attn.qkv.q": 3.0, "blocks.0.attn.qkv.k": 0.1,
                        "blocks.0.attn.qkv.v": 0.1, "blocks.0.mlp.fc1": 0.1}
    assert train(alloc, model, 11, 20) == [20]


def test_state_dict_round_trip_gives_identical_allocations():
    cfg = AllocatorConfig(target_sparsity=0.7)
    reference_model = FakeModel()
    reference = BudgetAllocator(reference_model.refs, cfg, 15, 3)
    train(reference, reference_model, 1, 7)

    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    resumed_model = FakeModel()
    resumed = BudgetAllocator(resumed_model.refs, cfg, 15, 3)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed_model.sparsity == reference_model.sparsity

    assert train(reference, reference_model, 8, 15) == train(resumed, resumed_model, 8, 15) == [9, 12]
    assert resumed.history == reference.history
    assert resumed_model.sparsity == reference_model.sparsity


def test_load_state_dict_rejects_other_matrices():
    cfg = AllocatorConfig(target_sparsity=0.7)
    state = BudgetAllocator(FakeModel().refs, cfg, 6, 3).state_dict()
    state["names"] = state["names"][:-1] + ["blocks.9.mlp.fc2"]
    with pytest.raises(ValueError, match="blocks.9.mlp.fc2"):
        BudgetAllocator(FakeModel().refs, cfg, 6, 3).load_state_dict(state)


def test_allocator_scores_match_the_spec_transcribed():
    """SPEC 5, written out here with plain loops (not the allocator's own functions): per factor element
    I = |theta * grad|, I_bar <- 0.85 I_bar + 0.15 I, U_bar <- 0.85 U_bar + 0.15 |I - I_bar| (both
    from 0), score = mean(I_bar_A U_bar_A) + mean(I_bar_B U_bar_B), normalised to sum 1."""
    model = FakeModel()
    alloc = BudgetAllocator(model.refs, AllocatorConfig(0.5), 4, 2)
    state = {r.name: {"A": [0.0, 0.0], "B": [0.0, 0.0]} for r in model.refs}  # per factor: flat lists
    for step in (1, 2, 3):
        model.fake_grads(step)
        alloc.update_scores()
        for r in model.refs:
            for key, factor in (("A", r.A), ("B", r.B)):
                theta = factor[r.segment].detach().reshape(-1).tolist()
                grad = factor.grad[r.segment].reshape(-1).tolist()
                i_bar, u_bar = state[r.name][key]
                if not isinstance(i_bar, list):
                    i_bar, u_bar = [0.0] * len(theta), [0.0] * len(theta)
                for n, (t, g) in enumerate(zip(theta, grad)):
                    imp = abs(t * g)
                    i_bar[n] = 0.85 * i_bar[n] + 0.15 * imp
                    u_bar[n] = 0.85 * u_bar[n] + 0.15 * abs(imp - i_bar[n])
                state[r.name][key] = [i_bar, u_bar]
    raw = [sum(sum(i * u for i, u in zip(*state[r.name][k])) / len(state[r.name][k][0]) for k in "AB")
           for r in model.refs]
    expected = torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64)
    torch.testing.assert_close(alloc.compute_scores(), expected, rtol=1e-5, atol=0)  # float32 EMAs
    assert len(set(expected.tolist())) == 4  # v, with the largest gradients, differs from q: the check can fail


def test_no_matrix_gets_sparsity_one():
    model = FakeModel()
    model.grad_scale["blocks.0.mlp.fc1"] = 0.0  # fc1's share rounds to 0
    alloc = BudgetAllocator(model.refs, AllocatorConfig(0.9), 4, 2)
    train(alloc, model, 1, 4)
    assert model.sparsity["blocks.0.mlp.fc1"] == 1 - 1 / 128
    assert alloc.current_budget() == 32
    # a target under one entry per matrix (0.01 * 320 = 3 < 4 matrices) is raised to one each
    tiny = FakeModel()
    alloc = BudgetAllocator(tiny.refs, AllocatorConfig(0.99), 4, 2)
    train(alloc, tiny, 1, 4)
    assert alloc.current_budget() == 4 and max(tiny.sparsity.values()) < 1


def test_grad_none_is_skipped():
    model = FakeModel()
    alloc = BudgetAllocator(model.refs, AllocatorConfig(0.5), 4, 2)
    alloc.update_scores()  # no grads anywhere yet
    assert alloc.compute_scores().tolist() == [0.25] * 4


_DIST_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from test_allocator import FakeModel, train
    from snella.allocator import AllocatorConfig, BudgetAllocator
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    model = FakeModel(seed=rank)
    if rank == 1:  # a rank whose scores disagree must still follow rank 0
        model.grad_scale = {k: 4.0 - v for k, v in model.grad_scale.items()}
    cfg = AllocatorConfig(0.8, schedule="adaptive", interval_steps=2, adaptive_threshold=0.01)
    alloc = BudgetAllocator(model.refs, cfg, 6, 2)
    train(alloc, model, 1, 6)
    print(sorted(model.sparsity.items()))
    dist.destroy_process_group()
""")


def test_distributed_ranks_follow_rank_zero(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DIST_SCRIPT)
    args = [str(tmp_path / "rendezvous"), str(Path(__file__).parent)]
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), *args], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    assert outputs[0][0] == outputs[1][0]
    assert "blocks.0.attn.qkv.v" in outputs[0][0]
