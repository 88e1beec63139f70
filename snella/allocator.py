"""SNELLA's layer-level competition: sensitivity scores, the cubic budget schedule, the share-out, and the allocator."""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from snella.config import SettingError

SCORES = ("sensitivity", "frobenius")
SCHEDULES = ("epoch", "steps", "adaptive")


@dataclass
class MatrixRef:
    """One adapted matrix that takes part in the budget competition."""

    name: str                       # e.g. "blocks.0.attn.qkv.q" ; unique
    A: torch.nn.Parameter           # factor of the layer, shape (S, P, in, r/P); this matrix owns A[segment]
    B: torch.nn.Parameter           # factor of the layer, shape (S, P, out_s, r/P); this matrix owns B[segment]
    segment: int                    # index into dim 0 of A and B (qkv layers hold 3 matrices: q, k, v)
    numel: int                      # entries of this matrix's update dW (out_s * in)
    get_sparsity: Callable[[], float]
    set_sparsity: Callable[[float], None]
    delta: Callable[[], torch.Tensor]  # current sparse update of this matrix (out_s, in), no grad; for the frobenius score


# ---------------------------------------------------------------- pure math


def sensitivity(param_slice: torch.Tensor, grad_slice: torch.Tensor) -> torch.Tensor:
    """Element-wise sensitivity I = |theta * grad| of one factor tensor.

    Non-finite entries become 0: NaN as SPEC says, and +-inf too, so that one overflowed
    step (mixed precision) cannot poison the running averages for the rest of training.

    Args:
        param_slice: the factor values theta, any shape.
        grad_slice: the gradient of the loss with respect to theta, same shape.

    Returns:
        A new tensor of theta's shape, >= 0 and finite.
    """
    if param_slice.shape != grad_slice.shape:
        raise ValueError(
            f"param and grad shapes differ: {tuple(param_slice.shape)} vs {tuple(grad_slice.shape)}"
        )
    importance = (param_slice.detach() * grad_slice.detach()).abs()
    return torch.where(torch.isfinite(importance), importance, torch.zeros_like(importance))


def ema_update(
    i_bar: Optional[torch.Tensor],
    u_bar: Optional[torch.Tensor],
    importance: torch.Tensor,
    beta1: float = 0.85,
    beta2: float = 0.85,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the smoothed sensitivity I_bar and its uncertainty U_bar (AdaLoRA's EMAs).

    I_bar <- b1 * I_bar + (1 - b1) * I, then U_bar <- b2 * U_bar + (1 - b2) * |I - I_bar|
    with the *updated* I_bar, as SPEC section 5 writes it. Both start at zero.

    Args:
        i_bar: previous I_bar, or None before the first step.
        u_bar: previous U_bar, or None before the first step.
        importance: this step's sensitivity I (see `sensitivity`).
        beta1: smoothing of I_bar.
        beta2: smoothing of U_bar.

    Returns:
        (new I_bar, new U_bar), new tensors of importance's shape.
    """
    if i_bar is None:
        i_bar = torch.zeros_like(importance)
    if u_bar is None:
        u_bar = torch.zeros_like(importance)
    new_i = beta1 * i_bar + (1.0 - beta1) * importance
    new_u = beta2 * u_bar + (1.0 - beta2) * (importance - new_i).abs()
    return new_i, new_u


def normalise_scores(raw: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Scale non-negative scores to sum 1; uniform when they are all zero.

    Args:
        raw: one score per matrix, finite and >= 0.

    Returns:
        float64 tensor of the same length summing to 1.
    """
    scores = torch.as_tensor(raw, dtype=torch.float64).flatten()
    if scores.numel() == 0:
        raise ValueError("cannot normalise an empty list of scores")
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError(f"scores must be finite and >= 0, got {scores.tolist()}")
    total = scores.sum()
    if total <= 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return scores / total


FactorEMAs = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def layer_scores(emas: Sequence[FactorEMAs]) -> torch.Tensor:
    """Normalised layer scores: mean(I_bar_A * U_bar_A) + mean(I_bar_B * U_bar_B), summing to 1.

    Args:
        emas: per matrix, (I_bar_A, U_bar_A, I_bar_B, U_bar_B); a factor whose EMAs are None
            (it never had a gradient) contributes 0.

    Returns:
        float64 tensor (num_matrices,), sums to 1 (uniform if every raw score is 0).
    """
    raw = []
    for i_a, u_a, i_b, u_b in emas:
        score = 0.0
        for i_bar, u_bar in ((i_a, u_a), (i_b, u_b)):
            if i_bar is not None and u_bar is not None:
                score += float((i_bar.double() * u_bar.double()).mean())
        raw.append(score)
    return normalise_scores(raw)


def budget_schedule(
    t: int, total: int, v_init: float, v_target: float, t_init: int = 0, t_final: int = 0
) -> float:
    """SPEC's cubic global budget V_t at allocation step t of `total`.

    V_t = v_target for t >= total - t_final (checked first, so a degenerate window ends at the
    target); v_init for t <= t_init; otherwise
    v_target + (v_init - v_target) * (1 - (t - t_init) / (total - t_final - t_init)) ** 3.

    Args:
        t: allocation step, >= 0.
        total: T, the last allocation step.
        v_init: budget before the schedule starts (entries kept).
        v_target: budget at and after total - t_final.
        t_init: warm-up steps t_i held at v_init.
        t_final: steps t_f held at v_target at the end.

    Returns:
        The budget as a float (the caller rounds it).
    """
    for name, value in (("t", t), ("total", total), ("t_init", t_init), ("t_final", t_final)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if t_init + t_final > total:
        raise ValueError(f"t_init + t_final must be <= total, got {t_init} + {t_final} > {total}")
    if t >= total - t_final:
        return float(v_target)
    if t <= t_init:
        return float(v_init)
    progress = (t - t_init) / (total - t_final - t_init)
    return v_target + (v_init - v_target) * (1.0 - progress) ** 3


def share_out(
    total_budget: int, scores: Sequence[float] | torch.Tensor, numels: Sequence[int], min_budget: int = 0
) -> list[int]:
    """Split an integer budget among matrices by score, never giving one more than its size.

    floor(V * p_l) capped at n_l; what the caps leave over is shared again in proportion to
    the scores of the matrices with room, until no cap binds; the few whole units the floors
    leave go one each to the matrices with room with the largest fractional share (then the
    largest score). Exact rational arithmetic, so the sum is exact for any budget size.
    Finally a matrix under `min_budget` is lifted to it, one unit at a time taken from the
    largest budget, so that a layer never gets sparsity 1 (which it rejects).

    Args:
        total_budget: V, entries to keep in all, >= 0.
        scores: one score per matrix, >= 0 (normalised or not; all zero means uniform).
        numels: n_l, the entries of each matrix, > 0.
        min_budget: entries every matrix keeps at least, <= every numel.

    Returns:
        budgets with sum == min(total_budget, sum(numels)) and min_budget <= budget_l <= numel_l.
    """
    total_budget = operator.index(total_budget)
    numels = [operator.index(n) for n in numels]
    raw = torch.as_tensor(scores, dtype=torch.float64).flatten().tolist()
    if total_budget < 0:
        raise ValueError(f"total_budget must be >= 0, got {total_budget}")
    if len(raw) != len(numels) or not numels:
        raise ValueError(f"need one score per matrix and at least one matrix, got {len(raw)} scores, {len(numels)} numels")
    if any(n <= 0 for n in numels):
        raise ValueError(f"numels must be > 0, got {numels}")
    if any(not math.isfinite(s) or s < 0 for s in raw):
        raise ValueError(f"scores must be finite and >= 0, got {raw}")
    min_budget = operator.index(min_budget)
    if not 0 <= min_budget <= min(numels) or min_budget * len(numels) > min(total_budget, sum(numels)):
        raise ValueError(
            f"min_budget={min_budget} must be in [0, smallest numel {min(numels)}] and leave "
            f"min_budget * {len(numels)} matrices <= the budget {min(total_budget, sum(numels))}"
        )

    weights = [Fraction(s) for s in raw]  # exact value of each float
    if sum(weights) == 0:
        weights = [Fraction(1)] * len(numels)
    budgets = [0] * len(numels)
    frac = [Fraction(0)] * len(numels)  # fractional part of each matrix's latest share
    remaining = min(total_budget, sum(numels))

    # proportional rounds: repeat while a cap pushes budget back into the pool
    while remaining > 0:
        room = [i for i, (b, n) in enumerate(zip(budgets, numels)) if b < n]
        share_w = {i: weights[i] for i in room}
        if sum(share_w.values()) == 0:
            # only zero-score matrices have room left: fill them by room so the total is still met
            share_w = {i: Fraction(numels[i] - budgets[i]) for i in room}
        w_sum = sum(share_w.values())
        capped, given = False, 0
        for i in room:
            share = remaining * share_w[i] / w_sum
            whole = math.floor(share)
            frac[i] = share - whole
            add = min(whole, numels[i] - budgets[i])
            capped |= add < whole
            budgets[i] += add
            given += add
        remaining -= given
        if not capped or given == 0:
            break

    # largest remainders: the units the floors left, one each
    while remaining > 0:
        room = [i for i, (b, n) in enumerate(zip(budgets, numels)) if b < n]
        room.sort(key=lambda i: (-frac[i], -weights[i], i))
        for i in room[:remaining]:
            budgets[i] += 1
        remaining -= min(remaining, len(room))

    # floor: lift starved matrices, one unit at a time from the richest
    for i in range(len(budgets)):
        while budgets[i] < min_budget:
            donor = max(range(len(budgets)), key=lambda j: (budgets[j] - min_budget, -j))
            budgets[donor] -= 1
            budgets[i] += 1
    return budgets


def sparsities_from_budgets(budgets: Sequence[int], numels: Sequence[int]) -> list[float]:
    """s_l = clip(1 - budget_l / n_l, 0, 1) per matrix.

    Args:
        budgets: entries kept per matrix.
        numels: entries per matrix.

    Returns:
        One sparsity per matrix.
    """
    return [min(1.0, max(0.0, 1.0 - b / n)) for b, n in zip(budgets, numels)]


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """Total-variation distance 0.5 * sum |p - q| between two distributions."""
    return 0.5 * float((p.double() - q.double()).abs().sum())


# ---------------------------------------------------------------- config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class AllocatorConfig:
    """How the global budget of kept entries shrinks and is re-shared among the adapted matrices."""

    target_sparsity: float = field(
        metadata={"help": "sparsity of all matrices together at the end, in [0, 1) (e.g. 0.8 for cifar)"}
    )
    init_sparsity: float = field(
        default=0.01, metadata={"help": "sparsity of every matrix in the first interval (authors: 0.01, almost dense)"}
    )
    score: str = field(
        default="sensitivity",
        metadata={"help": "'sensitivity' (AdaLoRA EMAs of |theta*grad|, the authors') or 'frobenius' (||dW||_F, cheaper)"},
    )
    schedule: str = field(
        default="epoch",
        metadata={"help": "'epoch' (authors: every epoch), 'steps' (every interval_steps), 'adaptive' (see allocator)"},
    )
    interval_steps: Optional[int] = field(
        default=None, metadata={"help": "optimizer steps between allocations/checks; needed by 'steps' and 'adaptive'"}
    )
    adaptive_threshold: float = field(
        default=0.05,
        metadata={"help": "'adaptive': reallocate when scores move this much (TV distance) or the budget this much (relative)"},
    )
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity I_bar (AdaLoRA's value)"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty U_bar (AdaLoRA's value)"})
    warmup: int = field(default=0, metadata={"help": "t_i: allocation units held at the init budget (authors: 0)"})
    final: int = field(default=0, metadata={"help": "t_f: allocation units held at the target at the end (authors: 0)"})

    def __post_init__(self) -> None:
        def bad(name: str, accepted: str) -> None:
            raise SettingError(name, getattr(self, name), accepted)

        # init first: a caller checking init_sparsity alone passes it as the target too
        for name in ("init_sparsity", "target_sparsity"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number in [0, 1)")
        if self.init_sparsity > self.target_sparsity:
            bad("init_sparsity", f"at most target_sparsity={self.target_sparsity} (the budget only shrinks)")
        if self.score not in SCORES:
            bad("score", ", ".join(SCORES))
        if self.schedule not in SCHEDULES:
            bad("schedule", ", ".join(SCHEDULES))
        if self.interval_steps is not None and (not _is_int(self.interval_steps) or self.interval_steps <= 0):
            bad("interval_steps", "a positive integer or None")
        if self.schedule in ("steps", "adaptive") and self.interval_steps is None:
            bad("interval_steps", f"a positive integer, which schedule={self.schedule!r} needs")
        if not _is_number(self.adaptive_threshold) or not self.adaptive_threshold > 0:
            bad("adaptive_threshold", "a number > 0")
        for name in ("beta1", "beta2"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number in [0, 1)")
        for name in ("warmup", "final"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an integer >= 0 (allocation units)")


# ---------------------------------------------------------------- allocator


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


class BudgetAllocator:
    """Re-shares the global budget of kept dW entries among the adapted matrices during training.

    Allocation points. Training is cut into N intervals of `unit` optimizer steps (unit =
    steps_per_epoch for schedule 'epoch', interval_steps otherwise; N = ceil(total_steps / unit)).
    Allocation step t = k happens at the start of interval k, i.e. after k * unit optimizer
    steps, for k = 0 .. T with T = N - 1. t = 0 is the construction: every matrix is set to
    init_sparsity, so the first interval runs at the init budget sum (1 - s_init) n_l. t = T
    gives exactly the target budget, so the last interval runs at the target. For 'epoch'
    with E epochs that is t = e at the start of epoch e and T = E - 1. With a single interval
    (T = 0) the target sparsity is set at construction: the only interval is also the last.

    Every matrix keeps at least one entry (layers take sparsity in [0, 1), never 1): a matrix
    whose share rounds to 0 gets 1 from the largest budget, and a global budget under one
    entry per matrix is raised to that.

    Warm-up and final (t_i, t_f, in allocation units): while t <= t_i no reallocation happens
    (the uniform init holds); the allocation made when the schedule first reaches the target
    (t >= T - t_f) is kept to the end, as AdaLoRA freezes its final ranks.

    Schedule 'adaptive' checks at every allocation point and reallocates only when the
    normalised scores moved by more than adaptive_threshold in total-variation distance since
    the last allocation, or the scheduled budget moved by more than adaptive_threshold
    relative to the last allocated one, and always when the target is first reached (and at
    the first check, since the init used no scores).

    Data parallel: if torch.distributed is initialised, rank 0's integer budgets (and, for
    'adaptive', its decision to reallocate) are broadcast before they are applied. The scores
    agree on every rank anyway, since they are computed after the gradients are all-reduced;
    the broadcast guards against float drift turning into different masks, or a hang.

    Usage: after `optimizer.step()` and before `zero_grad()`, call `update_scores()` then
    `step(global_step)` with the number of optimizer steps done so far.
    """

    def __init__(
        self, matrices: list[MatrixRef], config: AllocatorConfig, total_steps: int, steps_per_epoch: int
    ) -> None:
        """Check the matrices and training length, and set every matrix to the init sparsity.

        Args:
            matrices: the adapted matrices, with unique names.
            config: the validated allocator config.
            total_steps: optimizer steps the training will take.
            steps_per_epoch: optimizer steps per epoch.
        """
        if not matrices:
            raise ValueError("matrices is empty: the allocator needs at least one adapted matrix")
        names = [m.name for m in matrices]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"matrix names must be unique, repeated: {duplicates}")
        for m in matrices:
            if not _is_int(m.numel) or m.numel <= 0:
                raise ValueError(f"matrix {m.name!r}: numel must be a positive int, got {m.numel!r}")
            if not 0 <= m.segment < min(m.A.shape[0], m.B.shape[0]):
                raise ValueError(
                    f"matrix {m.name!r}: segment {m.segment} out of range for A {tuple(m.A.shape)}, B {tuple(m.B.shape)}"
                )
        for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        self.matrices = list(matrices)
        self.config = config
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.unit = steps_per_epoch if config.schedule == "epoch" else config.interval_steps
        self.last_t = math.ceil(total_steps / self.unit) - 1  # T
        if self.last_t > 0 and config.warmup + config.final > self.last_t:
            raise ValueError(
                f"warmup + final = {config.warmup} + {config.final} must be <= {self.last_t}, the last allocation "
                f"step for {total_steps} steps at {self.unit} steps per allocation; lower warmup/final"
            )
        self.numels = [m.numel for m in matrices]
        self.v_init = math.fsum((1.0 - config.init_sparsity) * n for n in self.numels)
        self.v_target = math.fsum((1.0 - config.target_sparsity) * n for n in self.numels)

        # per matrix: [I_bar_A, U_bar_A, I_bar_B, U_bar_B], None until its factor has a gradient
        self._ema: dict[str, list[Optional[torch.Tensor]]] = {m.name: [None] * 4 for m in matrices}
        self._t_seen = 0           # latest allocation step reached by step()
        self._global_step = 0
        self._last_scores: Optional[torch.Tensor] = None
        self.history: list[dict[str, Any]] = []

        # t = 0: uniform sparsity, no scores yet
        sparsity = config.target_sparsity if self.last_t == 0 else config.init_sparsity
        self._frozen = self.last_t == 0  # the target allocation is made and kept
        self._budget = _round_half_up(math.fsum((1.0 - sparsity) * n for n in self.numels))
        self._sparsities = [sparsity] * len(matrices)
        self._apply()
        self._record(t=0, densities=[1.0 - sparsity] * len(matrices))

    # -------------------------------------------------------------- scores

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold the current |theta * grad| of every factor into its EMAs (after optimizer.step()).

        Factors without a gradient are skipped. Nothing to do for the frobenius score.
        """
        if self.config.score != "sensitivity":
            return
        beta1, beta2 = self.config.beta1, self.config.beta2
        for m in self.matrices:
            ema = self._ema[m.name]
            for k, factor in enumerate((m.A, m.B)):
                if factor.grad is None:
                    continue
                importance = sensitivity(factor[m.segment], factor.grad[m.segment])  # (P, in|out, r/P)
                ema[2 * k], ema[2 * k + 1] = ema_update(ema[2 * k], ema[2 * k + 1], importance, beta1, beta2)

    @torch.no_grad()
    def compute_scores(self) -> torch.Tensor:
        """Normalised scores of the matrices now: float64 (num_matrices,), summing to 1."""
        if self.config.score == "frobenius":
            return normalise_scores([float(m.delta().double().norm()) for m in self.matrices])
        return layer_scores([tuple(self._ema[m.name]) for m in self.matrices])

    # -------------------------------------------------------------- schedule

    def budget_at(self, t: int) -> int:
        """Scheduled global budget (entries kept, rounded half up) at allocation step t."""
        if self.last_t == 0:
            return _round_half_up(self.v_target)
        v = budget_schedule(min(t, self.last_t), self.last_t, self.v_init, self.v_target,
                            self.config.warmup, self.config.final)
        return _round_half_up(v)

    def current_budget(self) -> int:
        """Global budget of the allocation in force (entries kept in all matrices)."""
        return self._budget

    def step(self, global_step: int) -> bool:
        """Reallocate if an allocation point was reached; call once after every optimizer step.

        Args:
            global_step: optimizer steps done so far (1 after the first step).

        Returns:
            True if the sparsities were changed.
        """
        self._global_step = global_step
        t = min(global_step // self.unit, self.last_t)
        if t <= self._t_seen:  # mid-interval, or a repeated call
            return False
        self._t_seen = t
        if t <= self.config.warmup or self._frozen:
            return False
        scores = None
        if self.config.schedule == "adaptive":
            scores = self.compute_scores()
            if not self._broadcast_flag(self._moved_enough(t, scores)):
                return False
        self.reallocate(t, scores=scores)
        return True

    def _moved_enough(self, t: int, scores: torch.Tensor) -> bool:
        if t >= self.last_t - self.config.final or self._last_scores is None:
            return True
        threshold = self.config.adaptive_threshold
        if total_variation(scores, self._last_scores) > threshold:
            return True
        budget = self.budget_at(t)
        return abs(budget - self._budget) > threshold * max(self._budget, 1)

    def reallocate(self, t: int, scores: Optional[torch.Tensor] = None) -> list[int]:
        """Share the scheduled budget of allocation step t by score and set every matrix's sparsity.

        Args:
            t: allocation step in 0 .. T.
            scores: normalised scores to use; computed now if None.

        Returns:
            The per-matrix budgets applied.
        """
        if scores is None:
            scores = self.compute_scores()
        # at least one entry per matrix: the layers accept sparsity in [0, 1) only
        total = max(self.budget_at(t), len(self.numels))
        budgets = share_out(total, scores, self.numels, min_budget=1)
        budgets = self._broadcast_budgets(budgets)
        self._budget = sum(budgets)
        self._sparsities = sparsities_from_budgets(budgets, self.numels)
        self._last_scores = scores.detach().double().cpu().clone()
        self._frozen = t >= self.last_t - self.config.final
        self._apply()
        self._record(t=t, densities=[b / n for b, n in zip(budgets, self.numels)])
        return budgets

    # -------------------------------------------------------------- plumbing

    def _apply(self) -> None:
        for m, s in zip(self.matrices, self._sparsities):
            m.set_sparsity(float(s))

    def _record(self, t: int, densities: list[float]) -> None:
        self.history.append({
            "step": self._global_step,
            "epoch": self._global_step // self.steps_per_epoch,
            "t": t,
            "budget": self._budget,
            "density": self._budget / sum(self.numels),
            "densities": {m.name: d for m, d in zip(self.matrices, densities)},
        })

    def _dist_device(self) -> torch.device:
        return self.matrices[0].A.device

    def _broadcast_budgets(self, budgets: list[int]) -> list[int]:
        if not (dist.is_available() and dist.is_initialized()):
            return budgets
        buf = torch.tensor(budgets, dtype=torch.int64, device=self._dist_device())
        dist.broadcast(buf, src=0)
        return [int(b) for b in buf.tolist()]

    def _broadcast_flag(self, flag: bool) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return flag
        buf = torch.tensor([int(flag)], dtype=torch.int64, device=self._dist_device())
        dist.broadcast(buf, src=0)
        return bool(buf.item())

    # -------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: EMAs, counters, last scores, sparsities, history."""
        return {
            "config": asdict(self.config),
            "names": [m.name for m in self.matrices],
            "ema": {name: [None if x is None else x.detach().cpu().clone() for x in ema]
                    for name, ema in self._ema.items()},
            "t_seen": self._t_seen,
            "global_step": self._global_step,
            "frozen": self._frozen,
            "budget": self._budget,
            "sparsities": list(self._sparsities),
            "last_scores": None if self._last_scores is None else self._last_scores.clone(),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` and re-apply the saved sparsities to the matrices.

        Args:
            state: a dict from `state_dict()` of an allocator over the same matrix names.
        """
        names = [m.name for m in self.matrices]
        if state.get("names") != names:
            saved = state.get("names") or []
            raise ValueError(
                "allocator state is for other matrices: missing "
                f"{sorted(set(names) - set(saved))}, unexpected {sorted(set(saved) - set(names))}"
                + ("" if set(saved) != set(names) else " (same names, other order)")
            )
        for m in self.matrices:
            device = m.A.device
            self._ema[m.name] = [None if x is None else x.to(device).clone() for x in state["ema"][m.name]]
        self._t_seen = int(state["t_seen"])
        self._global_step = int(state["global_step"])
        self._frozen = bool(state["frozen"])
        self._budget = int(state["budget"])
        self._sparsities = [float(s) for s in state["sparsities"]]
        last = state["last_scores"]
        self._last_scores = None if last is None else torch.as_tensor(last, dtype=torch.float64).clone()
        self.history = copy.deepcopy(state["history"])
        self._apply()
