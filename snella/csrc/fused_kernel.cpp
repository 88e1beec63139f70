// The CPU passes of the weight-level competition (SPEC section 4), fused: the selection of each
// matrix's threshold and the masking passes of forward and backward.
//
// In the eager torch path these were the largest part of the kernel's cost after the GEMMs: the
// threshold took a sampled bracket, two kthvalue calls and a pass that gathers a band (about 6 ns an
// element at ViT-B sizes), and each masking pass was four elementwise ops with a full-size temporary.
// Here the threshold is an exact radix select (two passes over the matrix) and each masking pass is a
// single loop. The kernel values themselves (distances, softmax) stay in torch, so the forward and the
// backward compute bit-identical K' and the mask is the same entries in both.
//
// Built with -ffp-contract=off, so a*b + c rounds as torch's separate mul and add do.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

template <typename T>
inline T multiplier(T kp, bool sparse, bool magnitude, T t) {
  if (!sparse) return T(1);
  const T m = std::abs(kp);
  if (magnitude) return m > t ? m : T(0);  // m * 1[m > t], the authors' competition
  return std::max(m - t, T(0));            // soft threshold (SNELL eq. 5)
}

// Exact k-th smallest (1-indexed) |x| of a contiguous array: a radix select on the magnitude's bits
// (for non-negative IEEE values the bit pattern orders like the value). One pass counts the top 16
// bits per thread, a second gathers the one bucket that holds rank k, and nth_element finishes.
template <typename T, typename U>
T kth_abs_impl(const T* x, int64_t n, int64_t k) {
  constexpr int SHIFT = sizeof(U) * 8 - 1 - 16;  // the 16 bits below the sign
  constexpr U MASK = ~(U(1) << (sizeof(U) * 8 - 1));
  constexpr int64_t NB = 1 << 16;
  auto key = [&](int64_t i) {
    U u;
    std::memcpy(&u, x + i, sizeof(U));
    return u & MASK;
  };
  const int64_t grain = 1 << 16;
  const int64_t pieces = (n + grain - 1) / grain;
  std::vector<uint32_t> hist(NB, 0);
  std::vector<std::vector<uint32_t>> local(at::get_num_threads());
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    auto& h = local[at::get_thread_num()];
    if (h.empty()) h.assign(NB, 0);
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t lo = piece * grain, hi = std::min(n, lo + grain);
      for (int64_t i = lo; i < hi; ++i) ++h[key(i) >> SHIFT];
    }
  });
  for (auto& h : local) {
    if (h.empty()) continue;
    for (int64_t b = 0; b < NB; ++b) hist[b] += h[b];
  }
  int64_t below = 0, bucket = 0;
  for (; bucket < NB; ++bucket) {
    if (below + hist[bucket] >= k) break;
    below += hist[bucket];
  }
  std::vector<std::vector<U>> found(pieces);
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t lo = piece * grain, hi = std::min(n, lo + grain);
      auto& f = found[piece];
      for (int64_t i = lo; i < hi; ++i) {
        const U u = key(i);
        if (static_cast<int64_t>(u >> SHIFT) == bucket) f.push_back(u);
      }
    }
  });
  std::vector<U> band;
  band.reserve(hist[bucket]);
  for (auto& f : found) band.insert(band.end(), f.begin(), f.end());
  const int64_t r = k - below - 1;  // 0-indexed rank inside the bucket
  std::nth_element(band.begin(), band.begin() + r, band.end());
  T v;
  std::memcpy(&v, &band[r], sizeof(T));
  return v;
}

double kth_abs(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "kth_abs takes a contiguous CPU tensor");
  const int64_t n = x.numel();
  TORCH_CHECK(1 <= k && k <= n, "k = ", k, " is outside [1, ", n, "]");
  if (x.scalar_type() == at::kFloat) return kth_abs_impl<float, uint32_t>(x.data_ptr<float>(), n, k);
  TORCH_CHECK(x.scalar_type() == at::kDouble, "kth_abs takes float32 or float64");
  return kth_abs_impl<double, uint64_t>(x.data_ptr<double>(), n, k);
}

void check_per_matrix(const std::vector<double>& thresholds, const std::vector<bool>& sparse, int64_t S) {
  TORCH_CHECK(static_cast<int64_t>(thresholds.size()) == S && static_cast<int64_t>(sparse.size()) == S,
              "one threshold and one sparse flag per matrix");
}

template <typename T>
void multiplier_impl(T* o, const T* base, int64_t n, bool sparse, bool magnitude, T t) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    if (base) {
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) o[k] = o[k] * multiplier(o[k], sparse, magnitude, t) + base[k];
    } else {
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) o[k] = o[k] * multiplier(o[k], sparse, magnitude, t);
    }
  });
}

// out (S, M) <- out * multiplier(out) + base, in place: the competition's pass after the selection.
void apply_multiplier(at::Tensor out, const c10::optional<at::Tensor>& base, const std::vector<double>& thresholds,
                      const std::vector<bool>& sparse, bool magnitude) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous(), "out must be a contiguous (S, M) tensor");
  if (base.has_value()) {
    TORCH_CHECK(base->sizes() == out.sizes() && base->is_contiguous() && base->scalar_type() == out.scalar_type(),
                "base must be a contiguous tensor of out's shape and dtype");
  }
  const int64_t S = out.size(0), M = out.size(1);
  check_per_matrix(thresholds, sparse, S);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "snella_apply_multiplier", [&] {
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t* bs = base.has_value() ? base->data_ptr<scalar_t>() + s * M : nullptr;
      if (!sparse[s] && !bs) continue;
      multiplier_impl<scalar_t>(out.data_ptr<scalar_t>() + s * M, bs, M, sparse[s], magnitude,
                                scalar_t(thresholds[s]));
    }
  });
}

template <typename T>
void competition_grad_impl(T* kp, T* g, int64_t n, bool sparse, bool magnitude, T t, bool update) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    if (update) {
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) {
        const T mult = multiplier(kp[k], sparse, magnitude, t);
        g[k] *= mult;
        kp[k] *= mult;
      }
    } else {
#pragma omp simd
      for (int64_t k = begin; k < end; ++k) g[k] *= multiplier(kp[k], sparse, magnitude, t);
    }
  });
}

// The backward's masking pass over a block, in place: g (S, M) <- g * multiplier(K'), the gradient
// reaching K' (the multiplier is a constant); with `update`, also kp (S, M) <- K' * multiplier(K'),
// the block's sparse update. Dense matrices (sparse[s] false) have multiplier 1.
void competition_grad(at::Tensor kp, at::Tensor g, const std::vector<double>& thresholds,
                      const std::vector<bool>& sparse, bool magnitude, bool update) {
  TORCH_CHECK(kp.dim() == 2 && kp.is_contiguous() && g.is_contiguous() && g.sizes() == kp.sizes() &&
                  g.scalar_type() == kp.scalar_type(),
              "kp and g must be contiguous (S, M) tensors of one shape and dtype");
  const int64_t S = kp.size(0), M = kp.size(1);
  check_per_matrix(thresholds, sparse, S);
  AT_DISPATCH_FLOATING_TYPES(kp.scalar_type(), "snella_competition_grad", [&] {
    for (int64_t s = 0; s < S; ++s) {
      if (!sparse[s]) continue;  // multiplier 1: nothing to do
      competition_grad_impl<scalar_t>(kp.data_ptr<scalar_t>() + s * M, g.data_ptr<scalar_t>() + s * M, M, true,
                                      magnitude, scalar_t(thresholds[s]), update);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kth_abs", &kth_abs, "exact k-th smallest absolute value (1-indexed)");
  m.def("apply_multiplier", &apply_multiplier, "competition multiplier and base, in place");
  m.def("competition_grad", &competition_grad, "backward masking pass of a block, in place");
}
