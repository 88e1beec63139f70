"""Diagnose why SNELLA-32 damages EfficientNet-Lite0 in the accuracy suite (issue 10 item 1).

Measures only: no library code is changed. Everything is built with the suite's own functions
(snella.bench.tasks.build_task, snella.bench.accuracy BACKBONES / _tensors / METHODS, the
TrainConfig, optimizer, scheduler and allocator of `train_and_score`), so numbers are comparable
with `snella bench accuracy`. Runs train on the task's train split and are scored on its val
split (never test). One seed: every accuracy is a one-seed indication.

Sections printed:
  1. ||dW||_F / ||W0||_F per adapted matrix at init and after training: mixed kernel (full), the
     K-only part (same factors, alpha = beta = 0, same sparsity and competition), the extra term
     alpha*softmax(K/gamma)+beta alone, and the fraction of dW that is a per-column constant
     (coherent: adds a multiple of each input channel to every output); piecewise (SNELL-style)
     run for comparison.
  2. Relative change of each block's output on a fixed batch of val images (eval mode) against
     the pristine pretrained model, and the shift of the input of the BatchNorm after each adapted
     conv relative to that BN's running statistics.
  3. Gradient scale of A, B, alpha, gamma, beta in the first steps, relative to each parameter.
  4. The allocator's history: matrices starved (density < 0.05) or dense (> 0.95).
  5. Controlled variants scored on val.

Usage:
  PYTHONPATH=. .venv/bin/python scripts/diagnose_convnet.py --task digits
  options: --task, --epochs, --lr, --seed, --variants (comma list or 'all'), --batch-images
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import snella.functional as Fn
import snella.ops as ops
from snella.bench.accuracy import BACKBONES, METHODS, _tensors
from snella.bench.tasks import build_task
from snella.layer import SnellaLayer
from snella.train import _allocator
from snella.training.config import TrainConfig
from snella.training.data import batches, epoch_order, num_batches
from snella.training.evaluation import accuracy
from snella.training.methods import SnellaMethod, get_method
from snella.training.norm import set_train_mode
from snella.training.optim import build_optimizer, build_scheduler, update_step

BACKBONE = BACKBONES["effnet"]
MF = torch.channels_last


# ------------------------------------------------------------------ variant machinery


_original_mixed = Fn.mixed_kernel


def _centred_mixed(A, B, coefficients, alpha, gamma, beta, drop_beta=False):
    """Mixed kernel with alpha*softmax centred per column (over the out index); beta kept unless drop_beta."""
    K = Fn.piecewise_kernel(A, B, coefficients)
    soft = torch.softmax(K / gamma[..., None, None], dim=-2)
    extra = alpha[..., None, None] * soft
    extra = extra - extra.mean(dim=-2, keepdim=True)
    return K + extra + (0.0 * beta[..., None, None] if drop_beta else beta[..., None, None])  # 0*beta: keeps beta in the graph


@contextmanager
def kernel_patch(kind: str):
    """kind 'centred' / 'centred_nobeta': route 'mixed' through the autograd path with a centred softmax."""
    if kind == "none":
        yield
        return
    saved_fast = ops.FAST_KERNELS
    ops.FAST_KERNELS = ()
    Fn.mixed_kernel = (lambda *a: _centred_mixed(*a, drop_beta=kind == "centred_nobeta"))
    try:
        yield
    finally:
        ops.FAST_KERNELS = saved_fast
        Fn.mixed_kernel = _original_mixed


def build(method: str, lr: float, seed: int, num_classes: int, snapshot, epochs: int, batch: int, **over):
    """The model, config and runner exactly as train_and_score builds them (plus overrides)."""
    spec = METHODS[method] if method in METHODS else None
    settings = dict(spec.settings) if spec else {}
    kernel = over.pop("kernel", None)
    settings.update(over)
    config = TrainConfig(**settings, lr=lr, epochs=epochs, batch_size=batch, warmup_epochs=1, random_shift=0,
                         weight_decay=1e-4, seed=seed, progress=False,
                         target_modules=list(BACKBONE.target_modules))
    torch.manual_seed(seed)
    model = BACKBONE.from_snapshot(num_classes, snapshot)
    torch.manual_seed(seed)
    runner = SnellaMethod("snella", kernel) if kernel else get_method(config.method)
    model = runner.apply(config, model).to(memory_format=MF)
    return model, config, runner


def train(model, config, runner, data, bn_eval=False, grad_probe=None, probe_steps=3):
    steps_per_epoch = num_batches(len(data), config.batch_size)
    total = config.epochs * steps_per_epoch
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, total, config.warmup_epochs * steps_per_epoch, config.lr,
                                config.warmup_lr, config.min_lr)
    allocator = _allocator(config, runner, model, total, steps_per_epoch)
    step = 0
    set_train_mode(model, "frozen" if bn_eval else "update")  # "update": the suite's mode when this was measured
    probes = []
    for epoch in range(config.epochs):
        for images, labels in batches(data, epoch_order(len(data), config.seed, epoch), config.batch_size):
            images = images.contiguous(memory_format=MF)
            loss = F.cross_entropy(model(images), labels)
            if grad_probe is not None and step < probe_steps:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                probes.append(grad_probe(model))
                optimizer.step()
                if allocator is not None:
                    allocator.update_scores()
                scheduler.step()
                step += 1
                if allocator is not None:
                    allocator.step(step)
            else:
                step = update_step(loss, optimizer, scheduler, allocator, step)
    return allocator, probes, loss.item()


# ------------------------------------------------------------------ measurements


def snella_layers(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, SnellaLayer):
            out[name[name.index("blocks."):]] = m
    return out


def short(name: str) -> str:
    return name.replace("blocks.", "b")


def dw_stats(model):
    """Per adapted matrix: ||dW||/||W0|| for full, K-only, extra-only; coherent fraction of dW."""
    rows = {}
    with torch.no_grad():
        for name, layer in snella_layers(model).items():
            adapter = layer.active_adapter
            cfg = layer.adapter_config[adapter]
            A, B, alpha, gamma, beta = layer.factors(adapter)
            c = layer.coefficients(adapter, A.device)
            W0 = layer.base_layer.weight.reshape(layer.base_layer.weight.shape[0], -1)
            w0 = W0.norm().item()
            s = layer.sparsity[adapter][0]
            full = layer.matrix_delta(adapter, 0)  # (out, in): what the layer adds (library path)
            K = Fn.piecewise_kernel(A, B, c)[0]
            k_only = Fn.sparsify(K, s, cfg.competition) if cfg.competition != "none" else K
            row = {"full": full.norm().item() / w0, "K": k_only.norm().item() / w0, "s": s}
            if cfg.kernel == "mixed":
                extra = alpha[0] * torch.softmax(K / gamma[0], dim=0) + beta[0]
                row["extra"] = extra.norm().item() / w0
                row["alpha"], row["gamma"], row["beta"] = alpha.item(), gamma.item(), beta.item()
            colmean = full.mean(dim=0, keepdim=True)  # per input channel, the part common to every output
            row["coh"] = (colmean.expand_as(full).norm() / full.norm().clamp_min(1e-30)).item()
            row["W0coh"] = (W0.mean(0, keepdim=True).expand_as(W0).norm() / W0.norm()).item()
            rows[name] = row
    return rows


def print_dw(title, rows, worst=6):
    print(f"\n### {title}")
    keys = [k for k in ("full", "K", "extra") if k in next(iter(rows.values()))]
    vals = {k: [r[k] for r in rows.values()] for k in keys + ["coh"]}
    print("| quantity | median | mean | max |")
    print("|---|---|---|---|")
    labels = {"full": "||dW||/||W0|| (full)", "K": "||dW_K||/||W0|| (alpha=beta=0)",
              "extra": "||alpha*softmax+beta||/||W0|| (before competition)",
              "coh": "coherent (column-mean) fraction of dW"}
    for k in keys + ["coh"]:
        v = vals[k]
        print(f"| {labels[k]} | {statistics.median(v):.4g} | {statistics.fmean(v):.4g} | {max(v):.4g} |")
    print(f"| coherent fraction of W0 (reference) | {statistics.median([r['W0coh'] for r in rows.values()]):.4g} | "
          f"{statistics.fmean([r['W0coh'] for r in rows.values()]):.4g} | {max(r['W0coh'] for r in rows.values()):.4g} |")
    top = sorted(rows.items(), key=lambda kv: -kv[1]["full"])[:worst]
    head = "| matrix | sparsity | full | K only | " + ("extra | alpha | gamma | beta | " if "extra" in keys else "") + "coherent |"
    print("\nworst matrices by ||dW||/||W0||:\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for n, r in top:
        cells = [short(n), f"{r['s']:.2f}", f"{r['full']:.4g}", f"{r['K']:.4g}"]
        if "extra" in keys:
            cells += [f"{r['extra']:.4g}", f"{r['alpha']:.3f}", f"{r['gamma']:.3f}", f"{r['beta']:.4f}"]
        cells.append(f"{r['coh']:.3f}")
        print("| " + " | ".join(cells) + " |")
    if "alpha" in next(iter(rows.values())):
        for k in ("alpha", "gamma", "beta"):
            v = [r[k] for r in rows.values()]
            print(f"{k}: min {min(v):.4f} median {statistics.median(v):.4f} max {max(v):.4f}")


def following_bn(model):
    """adapted conv name -> the BatchNorm module right after it in its block."""
    out = {}
    mods = dict(model.named_modules())
    for name in snella_layers(model):
        full = next(n for n in mods if n.endswith(name))
        parent_name, attr = full.rsplit(".", 1)
        children = list(mods[parent_name].named_children())
        idx = [n for n, _ in children].index(attr)
        bn = next(m for n, m in children[idx + 1:] if isinstance(m, nn.modules.batchnorm._BatchNorm))
        out[name] = bn
    return out


def block_modules(model):
    return {n[n.index("blocks."):]: m for n, m in model.named_modules() if re.search(r"blocks\.\d+\.\d+$", n)}


@torch.no_grad()
def capture(model, images):
    """Block outputs and per-channel mean/var of each BN input (the BN after each adapted conv)."""
    model.eval()
    feats, bn_in, hooks = {}, {}, []
    for n, m in block_modules(model).items():
        hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o.float().clone())))
    bns = following_bn(model) if any(isinstance(m, SnellaLayer) for m in model.modules()) else {}
    for n, bn in bns.items():
        hooks.append(bn.register_forward_pre_hook(_bn_input_stats(bn_in, n)))
    model(images.contiguous(memory_format=MF))
    for h in hooks:
        h.remove()
    return feats, bn_in, None


def _bn_input_stats(store: dict, name: str):
    """A BatchNorm pre-hook recording its input's per-channel mean/var beside its running statistics."""
    def pre(mod, args):
        x = args[0].float()
        store[name] = (x.mean((0, 2, 3)), x.var((0, 2, 3)), mod.running_mean.clone(), mod.running_var.clone() + mod.eps)
    return pre


@torch.no_grad()
def capture_base(base, images, names_from):
    """Same capture on the pristine model (its BNs found by the adapted model's layer names)."""
    base.eval()
    feats, bn_in, hooks = {}, {}, []
    for n, m in block_modules(base).items():
        hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o.float().clone())))
    mods = dict(base.named_modules())
    for name in names_from:
        parent_name, attr = name.rsplit(".", 1)
        children = list(mods[parent_name].named_children())
        idx = [c for c, _ in children].index(attr)
        bn = next(m for c, m in children[idx + 1:] if isinstance(m, nn.modules.batchnorm._BatchNorm))
        hooks.append(bn.register_forward_pre_hook(_bn_input_stats(bn_in, name)))
    base(images.contiguous(memory_format=MF))
    for h in hooks:
        h.remove()
    return feats, bn_in


def feature_report(title, model, base, images):
    feats, bn_in, _ = capture(model, images)
    bfeats, bbn = capture_base(base, images, list(bn_in))
    print(f"\n### {title}")
    print("block output change ||f - f_base|| / ||f_base|| (eval mode, pristine pretrained model as base):")
    print("| block | rel. change |")
    print("|---|---|")
    for n in feats:
        rel = ((feats[n] - bfeats[n]).norm() / bfeats[n].norm()).item()
        print(f"| {short(n)} | {rel:.4f} |")
    print("\nBN input vs that BN's running stats: z = mean_c |mu_c - running_mean_c| / sqrt(running_var_c); "
          "v = mean_c var_c / running_var_c. 'base' = pristine model with pristine stats on the same batch; "
          "'adapted' = adapted model with its own (possibly updated) running stats; "
          "dmu = mean_c (and max_c) |mu_c(adapted) - mu_c(base)| / sqrt(pristine running_var_c + eps); "
          "running vars include the BN's eps; 'small-var ch' = channels with pristine running_var + eps < 1e-3")
    print("| BN after | z base | v base | z adapted | v adapted | dmu mean | dmu max | small-var ch |")
    print("|---|---|---|---|---|---|---|---|")
    for n, (mu, var, rm, rv) in bn_in.items():
        bmu, bvar, brm, brv = bbn[n]
        dead = int((brv < 1e-3).sum())
        shift = (mu - bmu).abs() / brv.sqrt()  # per channel, in units of the pristine BN's std
        z_b = ((bmu - brm).abs() / brv.sqrt()).mean().item()
        v_b = (bvar / brv).mean().item()
        z_a = ((mu - rm).abs() / rv.sqrt()).mean().item()
        v_a = (var / rv).mean().item()
        print(f"| {short(n)} | {z_b:.3f} | {v_b:.3f} | {z_a:.3f} | {v_a:.3f} | {shift.mean().item():.3f} | "
              f"{shift.max().item():.3f} | {dead} / {brv.numel()} |")


def grad_probe(model):
    rows = {}
    for name, layer in snella_layers(model).items():
        a = layer.active_adapter
        row = {}
        for key, store in (("A", layer.snella_A), ("B", layer.snella_B), ("alpha", layer.snella_alpha),
                           ("gamma", layer.snella_gamma), ("beta", layer.snella_beta)):
            if a not in store:
                continue
            p = store[a]
            g = p.grad
            if g is None:
                row[key] = (float("nan"), p.norm().item())
            else:
                row[key] = (g.norm().item(), p.norm().item())
        rows[name] = row
    return rows


def print_grads(probes):
    print("\n### 3. gradient scale in the first steps (A, B: ||grad|| / ||param||; scalars: |grad| / max(|value|, 1))")
    for step, rows in enumerate(probes):
        print(f"\nstep {step}:")
        print("| factor | median ||g||/||p|| | max | min | median ||g|| |")
        print("|---|---|---|---|---|")
        for key in ("A", "B", "alpha", "gamma", "beta"):
            vals = [(r[key][0], r[key][1]) for r in rows.values() if key in r]
            if not vals:
                continue
            gs = [g for g, _ in vals]
            if key in ("A", "B"):
                rel = [g / p for g, p in vals]
            else:  # scalars: |grad| / max(|value|, 1) (beta starts at 0)
                rel = [g / max(p, 1.0) for g, p in vals]
            print(f"| {key} | {statistics.median(rel):.4g} | {max(rel):.4g} | {min(rel):.4g} | "
                  f"{statistics.median(gs):.4g} |")
    rows = probes[0]
    print("\nstep 0, per-layer ||g_A||/||A||, ||g_B||/||B||, |g_alpha|, |g_beta| (first and last 4 layers by grad of beta):")
    order = sorted(rows, key=lambda n: -rows[n].get("beta", (0, 0))[0])
    print("| matrix | gA/A | gB/B | |g_alpha| | |g_gamma| | |g_beta| |")
    print("|---|---|---|---|---|---|")
    for n in order[:4] + order[-4:]:
        r = rows[n]
        f = lambda k: r[k][0] / r[k][1] if k in r and r[k][1] > 0 else float("nan")  # noqa: E731
        g = lambda k: r[k][0] if k in r else float("nan")  # noqa: E731
        print(f"| {short(n)} | {f('A'):.4g} | {f('B'):.4g} | {g('alpha'):.4g} | {g('gamma'):.4g} | {g('beta'):.4g} |")


def print_history(allocator):
    print("\n### allocator history (density per matrix at each reallocation)")
    hist = allocator.history
    names = list(hist[0]["densities"])
    print("| step | global density | #matrices < 0.05 | #matrices > 0.95 | min | max |")
    print("|---|---|---|---|---|---|")
    for h in hist[:: max(1, len(hist) // 12)] + [hist[-1]]:
        d = list(h["densities"].values())
        print(f"| {h['step']} | {h['density']:.3f} | {sum(v < 0.05 for v in d)} | {sum(v > 0.95 for v in d)} | "
              f"{min(d):.3f} | {max(d):.3f} |")
    final = hist[-1]["densities"]
    ever_starved = [n for n in names if any(h["densities"][n] < 0.05 for h in hist[1:])]
    ever_dense = [n for n in names if any(h["densities"][n] > 0.95 for h in hist[1:])]
    print(f"\nmatrices ever starved (<0.05) after t=0: {len(ever_starved)} of {len(names)}: "
          + ", ".join(short(n) for n in ever_starved))
    print(f"matrices ever dense (>0.95) after t=0: {len(ever_dense)} of {len(names)}: "
          + ", ".join(short(n) for n in ever_dense))
    print("final density per matrix: " + ", ".join(f"{short(n)} {final[n]:.2f}" for n in names))
    # density changes between consecutive allocations
    jumps = [max(abs(b["densities"][n] - a["densities"][n]) for n in names) for a, b in zip(hist[1:], hist[2:])]
    if jumps:
        print(f"largest per-matrix density jump between consecutive reallocations: median {statistics.median(jumps):.3f}, "
              f"max {max(jumps):.3f}")


# ------------------------------------------------------------------ main


VARIANTS = {
    # name: (method, lr multiplier or absolute, overrides, bn_eval, kernel patch)
    "snella-32 (suite recipe)": ("snella-32", None, {}, False, "none"),
    "(a) BN eval mode in training": ("snella-32", None, {}, True, "none"),
    "(b) softmax term centred per column": ("snella-32", None, {}, False, "centred"),
    "(b') softmax centred and beta removed": ("snella-32", None, {}, False, "centred_nobeta"),
    "(c) competition none, sparsity 0 (dense mixed)": ("snella-32", None, {"sparsity": 0.0, "init_sparsity": 0.0, "competition": "none"},
                                                       False, "none"),
    "(d) piecewise kernel, same settings": ("snella-32", None, {"kernel": "piecewise"}, False, "none"),
    "(e) lr 1e-3": ("snella-32", 1e-3, {}, False, "none"),
    "linear probe (reference, lr 3e-2)": ("linear", 3e-2, {}, False, "none"),
    "linear probe, BN eval mode": ("linear", 3e-2, {}, True, "none"),
    "snell-8 (suite recipe, lr 1e-2)": ("snell-8", 1e-2, {}, False, "none"),
    "snell-8, BN eval mode (lr 1e-2)": ("snell-8", 1e-2, {}, True, "none"),
    "(a)+(c) dense mixed, BN eval mode": ("snella-32", None, {"sparsity": 0.0, "init_sparsity": 0.0, "competition": "none"}, True, "none"),
    "lora-8 (suite recipe, lr 1e-2)": ("lora-8", 1e-2, {}, False, "none"),
    "lora-8, BN eval mode (lr 1e-2)": ("lora-8", 1e-2, {}, True, "none"),
    "full (suite recipe, lr 1e-3)": ("full", 1e-3, {}, False, "none"),
    "full, BN eval mode (lr 1e-3)": ("full", 1e-3, {}, True, "none"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-images", type=int, default=64, help="val images of the fixed measurement batch")
    ap.add_argument("--variants", default="all", help="'all', 'none', or comma-separated indices into the list")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    task = build_task(args.task, 0)
    train_data = _tensors(task.splits["train"], task.classes, BACKBONE, args.task)
    val_data = _tensors(task.splits["val"], task.classes, BACKBONE, args.task)
    snapshot = BACKBONE.snapshot()
    images = torch.stack([val_data[i][0] for i in range(min(args.batch_images, len(val_data)))])
    nc = train_data.num_classes
    print(f"# convnet diagnosis: EfficientNet-Lite0, task {args.task} ({len(train_data)} train, {len(val_data)} val),"
          f" {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, seed {args.seed}")
    base = BACKBONE.from_snapshot(nc, snapshot).to(memory_format=MF)

    # ---- main instrumented run: snella-32 at the suite's recipe
    model, config, runner = build("snella-32", args.lr, args.seed, nc, snapshot, args.epochs, args.batch_size)
    for layer in snella_layers(model).values():  # the allocator starts every matrix at init_sparsity
        layer.set_sparsity(layer.active_adapter, 0, config.init_sparsity)
    print_dw("1. dW at init: snella-32 (mixed kernel, s = the allocator's init sparsity 0.01)", dw_stats(model))
    # init, at the target sparsity 0.5 as well (allocator sets 0.01 at start)
    feature_report("2. features at init: snella-32", model, base, images)
    snell, _, _ = build("snell-8", 1e-2, args.seed, nc, snapshot, args.epochs, args.batch_size)
    print_dw("1. dW at init: snell-8 (piecewise kernel, r=8, s=0.5)", dw_stats(snell))
    pw32, _, _ = build("snella-32", args.lr, args.seed, nc, snapshot, args.epochs, args.batch_size, kernel="piecewise")
    for layer in snella_layers(pw32).values():
        layer.set_sparsity(layer.active_adapter, 0, 0.01)
    print_dw("1. dW at init: piecewise kernel, r=32, s=0.01 (same factors as snella-32)", dw_stats(pw32))
    feature_report("2. features at init: piecewise r=32 s=0.01", pw32, base, images)
    del snell, pw32

    t1 = time.perf_counter()
    allocator, probes, last_loss = train(model, config, runner, train_data, grad_probe=grad_probe)
    acc, _ = accuracy(model, val_data, 256, torch.device("cpu"))
    print(f"\nsnella-32 lr {args.lr:g}: val {100 * acc:.1f}% (final train loss {last_loss:.3f}, "
          f"{time.perf_counter() - t1:.0f}s)")
    print_grads(probes)
    print_dw("1. dW after training: snella-32", dw_stats(model))
    feature_report("2. features after training: snella-32", model, base, images)
    print_history(allocator)
    results = {"snella-32 (suite recipe)": acc}

    # ---- variants
    names = list(VARIANTS)
    if args.variants == "none":
        chosen = []
    elif args.variants == "all":
        chosen = names[1:]
    else:
        chosen = [names[int(i)] for i in args.variants.split(",")]
    for name in chosen:
        method, lr, over, bn_eval, patch = VARIANTS[name]
        lr = args.lr if lr is None else lr
        t1 = time.perf_counter()
        with kernel_patch(patch):
            m, cfg, run = build(method, lr, args.seed, nc, snapshot, args.epochs, args.batch_size, **dict(over))
            train(m, cfg, run, train_data, bn_eval=bn_eval)
            a, _ = accuracy(m, val_data, 256, torch.device("cpu"))
            if name.startswith("(d)"):
                print_dw("1. dW after training: piecewise kernel r=32 (variant d)", dw_stats(m))
                feature_report("2. features after training: piecewise r=32 (variant d)", m, base, images)
            if name.startswith(("(a) ", "linear probe (reference", "snell-8 (suite")):
                feature_report(f"2. features after training: {name} (control)", m, base, images)
            if name.startswith("(a) "):
                print_dw("1. dW after training: snella-32 trained with BN in eval mode (variant a)", dw_stats(m))
            if name.startswith("(b)"):
                print_dw("1. dW after training: centred softmax (variant b)", dw_stats(m))
        results[name] = a
        print(f"\n{name}: val {100 * a:.1f}% ({time.perf_counter() - t1:.0f}s)", flush=True)

    print("\n### 5. variants, val accuracy (one seed each: indications, not results)")
    print("| variant | lr | val acc % |")
    print("|---|---|---|")
    for name, a in results.items():
        lr = VARIANTS[name][1] or args.lr
        print(f"| {name} | {lr:g} | {100 * a:.1f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
