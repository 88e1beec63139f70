"""The kernels and the weight-level competition against direct transcriptions of SPEC.md's formulas."""

import math

import pytest
import torch

from snella import functional as Fn


def factors(S=None, P=2, n_in=7, n_out=5, r=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lead = () if S is None else (S,)
    A = torch.randn(*lead, P, n_in, r // P, generator=g, dtype=dtype)
    B = torch.randn(*lead, P, n_out, r // P, generator=g, dtype=dtype)
    return A, B


def spec_piecewise(A, B, c):
    """SPEC 3: K[j, i] = sum_p c_p ||A[p, j, :] - B[p, i, :]||, shape (in, out); dW = K^T."""
    P, n_in, _ = A.shape
    n_out = B.shape[1]
    K = torch.zeros(n_in, n_out, dtype=A.dtype)
    for p in range(P):
        for j in range(n_in):
            for i in range(n_out):
                K[j, i] += c[p] * torch.linalg.vector_norm(A[p, j] - B[p, i])
    return K


def test_chunk_coefficients_alternate():
    assert Fn.chunk_coefficients(2).tolist() == pytest.approx([0.1, -0.1])
    assert Fn.chunk_coefficients(4, 0.5).tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5])


def test_piecewise_kernel_matches_spec():
    A, B = factors()
    c = Fn.chunk_coefficients(2, dtype=torch.float64)
    got = Fn.piecewise_kernel(A, B, c)  # (out, in)
    assert got.shape == (5, 7)
    torch.testing.assert_close(got, spec_piecewise(A, B, c).T, rtol=1e-10, atol=1e-12)


def test_piecewise_kernel_is_high_rank():
    """The point of the kernel: rank-r factors give a numerically full-rank update."""
    A, B = factors(n_in=40, n_out=30, r=4)
    K = Fn.piecewise_kernel(A, B, Fn.chunk_coefficients(2, dtype=torch.float64))
    assert torch.linalg.matrix_rank(K).item() == 30
    assert torch.linalg.matrix_rank(Fn.linear_kernel(A, B)).item() == 4


def test_mixed_kernel_matches_spec():
    A, B = factors()
    c = Fn.chunk_coefficients(2, dtype=torch.float64)
    alpha, gamma, beta = (torch.tensor(v, dtype=torch.float64) for v in (0.7, 0.3, -0.2))
    K = spec_piecewise(A, B, c)  # (in, out)
    soft = torch.softmax(K / gamma, dim=1)  # over the out index, for each in index j
    want = (K + alpha * soft + beta).T
    torch.testing.assert_close(Fn.mixed_kernel(A, B, c, alpha, gamma, beta), want, rtol=1e-10, atol=1e-12)


def test_batched_kernels_equal_per_matrix():
    A, B = factors(S=3)
    c = Fn.chunk_coefficients(2, dtype=torch.float64)
    alpha, gamma, beta = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.tensor([0.0, 0.1, -0.1], dtype=torch.float64)
    batched = Fn.mixed_kernel(A, B, c, alpha, gamma, beta)
    for s in range(3):
        torch.testing.assert_close(batched[s], Fn.mixed_kernel(A[s], B[s], c, alpha[s], gamma[s], beta[s]))


def test_option_kernels_match_formulas():
    A, B = factors()
    a_cat = torch.cat([A[0], A[1]], dim=-1)  # (in, r)
    b_cat = torch.cat([B[0], B[1]], dim=-1)  # (out, r)
    alpha, gamma, beta = (torch.tensor(v, dtype=torch.float64) for v in (1.5, 0.2, 0.3))
    d2 = torch.cdist(b_cat, a_cat) ** 2
    torch.testing.assert_close(Fn.rbf_kernel(A, B, alpha, gamma, beta), alpha * torch.exp(-beta * d2) + gamma)
    dot = b_cat @ a_cat.T
    torch.testing.assert_close(Fn.sigmoid_kernel(A, B, alpha, gamma, beta), alpha / (1 + torch.exp(-beta * dot)) + gamma)
    torch.testing.assert_close(Fn.linear_kernel(A, B), dot)  # LoRA: B A^T


def test_kernel_dispatch_rejects_unknown_name():
    A, B = factors()
    with pytest.raises(ValueError, match="unknown kernel 'gaussian'.*mixed"):
        Fn.kernel_delta("gaussian", A, B)


def test_distance_gradients_match_cdist():
    """The GEMM form of the distance must give cdist's values and gradients."""
    A, B = factors()
    A.requires_grad_()
    B.requires_grad_()
    w = torch.randn(2, 5, 7, dtype=torch.float64)
    g1 = torch.autograd.grad((Fn.pairwise_distance(A, B) * w).sum(), (A, B))
    g2 = torch.autograd.grad((torch.cdist(B, A) * w).sum(), (A, B))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_dense_kernels_pass_gradcheck():
    A, B = factors(n_in=4, n_out=3)
    A.requires_grad_()
    B.requires_grad_()
    c = Fn.chunk_coefficients(2, dtype=torch.float64)
    scalars = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.8, 1.2, 0.1)]
    assert torch.autograd.gradcheck(lambda a, b, al, ga, be: Fn.mixed_kernel(a, b, c, al, ga, be), (A, B, *scalars))
    assert torch.autograd.gradcheck(lambda a, b, al, ga, be: Fn.rbf_kernel(a, b, al, ga, be), (A, B, *scalars))
    assert torch.autograd.gradcheck(lambda a, b, al, ga, be: Fn.sigmoid_kernel(a, b, al, ga, be), (A, B, *scalars))


# ----------------------------------------------------------------------------- competition


@pytest.mark.parametrize("sparsity", [0.01, 0.3, 0.5, 0.8, 0.93])
def test_magnitude_competition_matches_spec(sparsity):
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(13, 17, generator=g, dtype=torch.float64)
    m = delta.abs()
    t = torch.quantile(m.flatten(), sparsity)  # SPEC: the s-quantile, strict >
    want = delta * m * (m > t)
    got = Fn.sparsify(delta, sparsity, "magnitude")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    n = delta.numel()
    assert int((got != 0).sum()) == n - math.floor(sparsity * (n - 1)) - 1


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.77])
def test_soft_competition_matches_paper(sparsity):
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(11, 9, generator=g, dtype=torch.float64)
    m = delta.abs()
    t = torch.quantile(m.flatten(), sparsity)  # interpolated, as torch.quantile computes it
    want = delta * torch.clamp(m - t, min=0)
    torch.testing.assert_close(Fn.sparsify(delta, sparsity, "soft"), want, rtol=1e-12, atol=1e-15)


def test_competition_gradient_is_detached_magnitude():
    """Kept entries get m * dL/d(dW_sparse); dropped ones nothing; the mask carries no gradient."""
    delta = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 8, dtype=torch.float64)
    out = Fn.sparsify(delta, 0.5)
    (grad,) = torch.autograd.grad(out, delta, upstream)
    m = delta.detach().abs()
    keep = out.detach() != 0
    torch.testing.assert_close(grad, upstream * m * keep)


def test_per_matrix_sparsity_in_a_batch():
    delta = torch.randn(3, 10, 10, dtype=torch.float64)
    out = Fn.sparsify(delta, [0.0, 0.5, 0.9])
    assert int((out[0] != 0).sum()) == 99  # s = 0: every entry but the smallest, times its magnitude
    assert torch.equal(out[0][out[0] != 0], (delta[0] * delta[0].abs())[out[0] != 0])
    assert int((out[1] != 0).sum()) == 100 - math.floor(0.5 * 99) - 1
    assert int((out[2] != 0).sum()) == 100 - math.floor(0.9 * 99) - 1


def test_ties_change_the_kept_count_by_at_most_the_tied_entries():
    delta = torch.cat([torch.full((50,), 0.5), torch.linspace(0.6, 1.0, 50)]).reshape(10, 10)
    out = Fn.sparsify(delta, 0.3)
    target_kept = 100 - math.floor(0.3 * 99) - 1
    kept = int((out != 0).sum())
    tied = int((delta == 0.5).sum())
    assert kept == 50  # all 0.5s tie at the threshold and are dropped together (strict >)
    assert abs(kept - target_kept) <= tied


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        Fn.sparsify(torch.randn(3, 3), bad)


def test_unknown_competition_mode_is_refused():
    with pytest.raises(ValueError, match="unknown competition mode 'hard'.*magnitude, soft"):
        Fn.sparsify(torch.randn(3, 3), 0.5, "hard")


# ----------------------------------------------------------------------------- selection at scale


@pytest.mark.parametrize("k_frac", [0.0, 0.01, 0.5, 0.8, 0.999, 1.0])
def test_kth_smallest_is_exact_on_structured_matrices(k_frac):
    """Column-structured values (like the mixed kernel's column softmax) must not fool the sampling."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 3072, 768
    col_scale = torch.rand(cols, generator=g) * 10  # each column lives on its own scale
    values = (torch.rand(rows, cols, generator=g) * col_scale).flatten()
    n = values.numel()
    k = max(1, min(n, round(k_frac * n)))
    assert Fn.kth_smallest(values, k).item() == torch.kthvalue(values, k).values.item()


@pytest.mark.parametrize("k_frac", [0.0, 0.02, 0.5, 0.97, 1.0])
def test_kth_smallest_of_magnitudes_is_exact(k_frac):
    """absolute=True selects on |values| piece by piece, as kthvalue on values.abs() does."""
    values = torch.randn(300_001, generator=torch.Generator().manual_seed(5))
    n = values.numel()
    k = max(1, min(n, round(k_frac * n)))
    assert Fn.kth_smallest(values, k, absolute=True).item() == torch.kthvalue(values.abs(), k).values.item()


def test_sparsify_works_beyond_torch_quantile_limit():
    """torch.quantile refused > 2^24 entries (pytorch #64947, before torch 2.x); 20M entries must work."""
    n_out, n_in = 5000, 4000  # 20M entries
    delta = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(4))
    out = Fn.sparsify(delta, 0.8)
    n = delta.numel()
    kept = int((out != 0).sum())
    assert abs(kept - (n - math.floor(0.8 * (n - 1)) - 1)) <= 64  # only float32 ties may move it
    threshold = delta.abs().flatten().kthvalue(math.floor(0.8 * (n - 1)) + 1).values
    assert torch.equal(out != 0, delta.abs() > threshold)
