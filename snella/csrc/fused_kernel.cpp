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
// Built with -ffp-contract=off, so a*b + c rounds as torch's separate mul and add do. Where the
// compiler has OpenMP, cpu_ext.py builds with -fopenmp and links torch's own OpenMP runtime, so
// at::parallel_for runs on torch's threads (torch.set_num_threads); otherwise the same loops run on
// one thread. Every result is the same for any number of threads (see kth_abs_impl and for_rows).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

namespace {

template <typename T>
inline T multiplier(T kp, bool sparse, bool magnitude, T t) {
  if (!sparse) return T(1);
  const T m = std::abs(kp);
  if (magnitude) return m > t ? m : T(0);  // m * 1[m > t], the authors' competition
  return std::max(m - t, T(0));            // soft threshold (SNELL eq. 5)
}

// Work below this many elements runs on the calling thread: a parallel region costs a few
// microseconds (and tens when the pool's threads have gone to sleep), which an elementwise pass over
// 32K values (torch's own at::internal::GRAIN_SIZE) takes about as long to do.
constexpr int64_t kElementGrain = 32768;
// The select splits its passes into at most one slab per thread, each at least this long: every slab
// has its own 256 KiB histogram to zero and sum (tens of microseconds), small next to counting 128K
// values (about 150 us), so 2 threads start at 256K values (a 768x768 matrix has 590K).
constexpr int64_t kSelectSlab = 1 << 17;

// Exact k-th smallest (1-indexed) |x| of a contiguous array: a radix select on the magnitude's bits
// (for non-negative IEEE values the bit pattern orders like the value). One pass counts the top 16
// bits, a second gathers the one bucket that holds rank k, and nth_element finishes.
//
// With several threads, each slab (a fixed split of the array, indexed by the loop variable, not by
// the thread that runs it) has its own histogram and its own gathered band; the histograms are summed
// in integers and the bands joined in slab order, so counts, band and result are the same for any
// number of threads (and the k-th value is unique whatever the band's order).
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
  const int64_t slabs = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kSelectSlab));
  const int64_t per = (n + slabs - 1) / slabs;
  TORCH_CHECK(per <= int64_t(UINT32_MAX), "kth_abs: ", n, " values are too many for its 32-bit counts");
  std::vector<std::vector<uint32_t>> local(slabs);
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      auto& h = local[t];
      h.assign(NB, 0);
      const int64_t lo = t * per, hi = std::min(n, lo + per);
      for (int64_t i = lo; i < hi; ++i) ++h[key(i) >> SHIFT];
    }
  });
  int64_t below = 0, bucket = 0, in_bucket = 0;
  for (; bucket < NB; ++bucket) {
    int64_t count = 0;
    for (const auto& h : local) count += h[bucket];
    if (below + count >= k) {
      in_bucket = count;
      break;
    }
    below += count;
  }
  std::vector<std::vector<U>> found(slabs);
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      auto& f = found[t];
      f.reserve(local[t][bucket]);
      const int64_t lo = t * per, hi = std::min(n, lo + per);
      for (int64_t i = lo; i < hi; ++i) {
        const U u = key(i);
        if (static_cast<int64_t>(u >> SHIFT) == bucket) f.push_back(u);
      }
    }
  });
  std::vector<U> band;
  band.reserve(in_bucket);
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

// Runs fn(row, lo, hi) over the entries [lo, hi) of the given rows of an (S, M) array, in one
// parallel region over all of them (not one region a row): the elementwise passes below. Each entry is
// computed alone, so the split (and the number of threads) does not change any value.
template <typename F>
void for_rows(const std::vector<int64_t>& rows, int64_t M, const F& fn) {
  const int64_t total = static_cast<int64_t>(rows.size()) * M;
  at::parallel_for(0, total, kElementGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin / M; r * M < end; ++r) {
      const int64_t lo = std::max(begin, r * M) - r * M, hi = std::min(end, (r + 1) * M) - r * M;
      fn(rows[r], lo, hi);
    }
  });
}

// `sparse` and `magnitude` are template parameters: as run-time flags inside the loop they kept GCC
// from vectorizing it (a branch an entry, mispredicted on the random side of the threshold: 3 ns an
// entry instead of 0.3).
template <typename T, bool SPARSE, bool MAGNITUDE>
void multiplier_impl(T* o, const T* base, int64_t lo, int64_t hi, T t) {
  if (base) {
#pragma omp simd
    for (int64_t k = lo; k < hi; ++k) o[k] = o[k] * multiplier(o[k], SPARSE, MAGNITUDE, t) + base[k];
  } else {
#pragma omp simd
    for (int64_t k = lo; k < hi; ++k) o[k] = o[k] * multiplier(o[k], SPARSE, MAGNITUDE, t);
  }
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
  std::vector<int64_t> rows;  // the matrices with something to do
  for (int64_t s = 0; s < S; ++s) {
    if (sparse[s] || base.has_value()) rows.push_back(s);
  }
  if (rows.empty() || M == 0) return;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "snella_apply_multiplier", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* b = base.has_value() ? base->data_ptr<scalar_t>() : nullptr;
    for_rows(rows, M, [&](int64_t s, int64_t lo, int64_t hi) {
      scalar_t* os = o + s * M;
      const scalar_t* bs = b ? b + s * M : nullptr;
      const scalar_t t = scalar_t(thresholds[s]);
      if (!sparse[s]) {
        multiplier_impl<scalar_t, false, false>(os, bs, lo, hi, t);
      } else if (magnitude) {
        multiplier_impl<scalar_t, true, true>(os, bs, lo, hi, t);
      } else {
        multiplier_impl<scalar_t, true, false>(os, bs, lo, hi, t);
      }
    });
  });
}

template <typename T, bool MAGNITUDE>
void competition_grad_impl(T* kp, T* g, int64_t lo, int64_t hi, T t, bool update) {
  if (update) {
#pragma omp simd
    for (int64_t k = lo; k < hi; ++k) {
      const T mult = multiplier(kp[k], true, MAGNITUDE, t);
      g[k] *= mult;
      kp[k] *= mult;
    }
  } else {
#pragma omp simd
    for (int64_t k = lo; k < hi; ++k) g[k] *= multiplier(kp[k], true, MAGNITUDE, t);
  }
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
  std::vector<int64_t> rows;  // multiplier 1 on the dense ones: nothing to do there
  for (int64_t s = 0; s < S; ++s) {
    if (sparse[s]) rows.push_back(s);
  }
  if (rows.empty() || M == 0) return;
  AT_DISPATCH_FLOATING_TYPES(kp.scalar_type(), "snella_competition_grad", [&] {
    scalar_t* k = kp.data_ptr<scalar_t>();
    scalar_t* gg = g.data_ptr<scalar_t>();
    for_rows(rows, M, [&](int64_t s, int64_t lo, int64_t hi) {
      const scalar_t t = scalar_t(thresholds[s]);
      if (magnitude) {
        competition_grad_impl<scalar_t, true>(k + s * M, gg + s * M, lo, hi, t, update);
      } else {
        competition_grad_impl<scalar_t, false>(k + s * M, gg + s * M, lo, hi, t, update);
      }
    });
  });
}

// How this build runs its loops: whether it was compiled with OpenMP, the thread count it sees, and
// how many distinct threads one parallel loop (of more work than the grain) actually ran on.
pybind11::dict parallel_info() {
  pybind11::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 0;
#endif
  info["num_threads"] = at::get_num_threads();
  std::mutex lock;
  std::set<int> seen;
  at::parallel_for(0, 1 << 20, kElementGrain, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    seen.insert(at::get_thread_num());
  });
  info["threads_used"] = static_cast<int64_t>(seen.size());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kth_abs", &kth_abs, "exact k-th smallest absolute value (1-indexed)");
  m.def("apply_multiplier", &apply_multiplier, "competition multiplier and base, in place");
  m.def("competition_grad", &competition_grad, "backward masking pass of a block, in place");
  m.def("parallel_info", &parallel_info, "OpenMP or not, threads seen and used by a parallel loop");
}
