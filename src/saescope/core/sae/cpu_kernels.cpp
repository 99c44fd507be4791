// saescope's CPU kernels: the per-row passes that torch runs as several full sweeps over a
// (tokens x d_sae) or (d_sae x d_model) matrix, done in one sweep each. Compiled once per machine
// by saescope/sae/cpu_kernels.py (torch.utils.cpp_extension, -march=native); every op has a
// pure-torch twin there, used when no compiler is at hand, and the tests compare the two.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr float INF = std::numeric_limits<float>::infinity();
constexpr int64_t BLOCK = 32;  // measured: 32 beats 16 (fewer maxima to rank, few extra candidates)

inline float nan_as_inf(float x) { return x != x ? INF : x; }

// pre + bias, where a bias of -inf excludes the column whatever pre holds (AuxK's mask of live latents:
// +inf + -inf would be NaN, which ranks first).
inline float biased(const float* row, const float* B, int64_t j) { return B[j] == -INF ? -INF : row[j] + B[j]; }

// torch.topk's order: NaN above everything, +inf included.
inline bool ranks_above(float a, float b) {
  const bool na = a != a, nb = b != b;
  return na != nb ? na : a > b;
}

#if defined(__AVX512F__)
inline __m512 add_bias(__m512 pre, __m512 bias) {
  const __mmask16 excluded = _mm512_cmp_ps_mask(bias, _mm512_set1_ps(-INF), _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(_mm512_add_ps(pre, bias), excluded, _mm512_set1_ps(-INF));
}
#endif

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(), name,
              ": a contiguous 2-d float32 CPU tensor is needed");
}

// The k largest of each row of (pre + bias), in no particular order; NaN ranks above everything,
// as in torch.topk, and a column whose bias is -inf counts as -inf. Exact: the k block maxima are k
// elements >= T (the k-th largest block maximum, NaN counted as +inf), so the k largest elements are
// all >= T (or NaN); only those (usually little more than k) are ranked.
// The bias is added on the fly, so the pre-activations stay a bare matmul output and AuxK can pass
// a bias with -inf on the live latents instead of rewriting the matrix.
std::tuple<at::Tensor, at::Tensor> topk_bias(const at::Tensor& pre, const at::Tensor& bias, int64_t k) {
  check_rows(pre, "pre");
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.is_contiguous() &&
                  bias.size(0) == pre.size(1), "bias: a contiguous float32 vector as wide as pre");
  const int64_t n = pre.size(0), d = pre.size(1);
  TORCH_CHECK(k >= 1 && k <= d, "k must be between 1 and the row width");
  auto values = at::empty({n, k}, pre.options());
  auto cols = at::empty({n, k}, pre.options().dtype(at::kLong));
  const float* P = pre.data_ptr<float>();
  const float* B = bias.data_ptr<float>();
  float* V = values.data_ptr<float>();
  int64_t* C = cols.data_ptr<int64_t>();
  const int64_t nb = (d + BLOCK - 1) / BLOCK;
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> maxima(nb), scratch(nb), cand_v;
    std::vector<int64_t> cand_c, order;
    cand_v.reserve(4 * k);
    cand_c.reserve(4 * k);
    for (int64_t r = lo; r < hi; ++r) {
      const float* row = P + r * d;
      int64_t b = 0;
#if defined(__AVX512F__)
      for (; (b + 1) * BLOCK <= d; ++b) {
        const float* p = row + b * BLOCK;
        const float* q = B + b * BLOCK;
        const __m512 v = add_bias(_mm512_loadu_ps(p), _mm512_loadu_ps(q));
        const __m512 u = add_bias(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(q + 16));
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q);
        maxima[b] = nan ? INF : _mm512_reduce_max_ps(_mm512_max_ps(v, u));
      }
#endif
      for (; b < nb; ++b) {
        float m = -INF;
        for (int64_t j = b * BLOCK, e = std::min(j + BLOCK, d); j < e; ++j) m = std::max(m, nan_as_inf(biased(row, B, j)));
        maxima[b] = m;
      }
      float T = -INF;
      if (nb > k) {
        std::copy(maxima.begin(), maxima.end(), scratch.begin());
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
        T = scratch[k - 1];
      }
      cand_v.clear();
      cand_c.clear();
      for (b = 0; b < nb; ++b) {
        if (!(maxima[b] >= T)) continue;
        int64_t j = b * BLOCK;
        const int64_t e = std::min(j + BLOCK, d);
#if defined(__AVX512F__)
        for (; j + 16 <= e; j += 16) {
          const __m512 v = add_bias(_mm512_loadu_ps(row + j), _mm512_loadu_ps(B + j));
          __mmask16 hit = _mm512_cmp_ps_mask(v, _mm512_set1_ps(T), _CMP_NLT_UQ);  // >= T, or NaN
          while (hit) {
            const int t = __builtin_ctz(hit);
            hit &= hit - 1;
            cand_v.push_back(biased(row, B, j + t));
            cand_c.push_back(j + t);
          }
        }
#endif
        for (; j < e; ++j) {
          const float x = biased(row, B, j);
          if (x >= T || x != x) {
            cand_v.push_back(x);
            cand_c.push_back(j);
          }
        }
      }
      const int64_t m = static_cast<int64_t>(cand_v.size());
      order.resize(m);
      std::iota(order.begin(), order.end(), int64_t{0});
      if (m > k)
        std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                         [&](int64_t a, int64_t c) { return ranks_above(cand_v[a], cand_v[c]); });
      for (int64_t i = 0; i < k; ++i) {
        const int64_t c = cand_c[order[i]];
        V[r * k + i] = cand_v[order[i]];
        C[r * k + i] = c;
      }
    }
  });
  return {values, cols};
}

// grad[i] -= (grad[i] . w[i]) w[i] for every row: the part of a unit-norm row's gradient that would
// change its norm, removed in one pass (torch: a vecdot with a full-size temporary, then addcmul).
at::Tensor project_rows_(at::Tensor grad, const at::Tensor& w) {
  check_rows(grad, "grad");
  check_rows(w, "w");
  TORCH_CHECK(grad.sizes() == w.sizes(), "grad and w must have the same shape");
  const int64_t n = w.size(0), d = w.size(1);
  float* G = grad.data_ptr<float>();
  const float* Wp = w.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* g = G + r * d;
      const float* x = Wp + r * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < d; ++j) dot += g[j] * x[j];
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) g[j] -= dot * x[j];
    }
  });
  return grad;
}

// w[i] /= max(|w[i]|, eps) for every row, in one pass (torch: a norm pass, then a division pass).
at::Tensor normalize_rows_(at::Tensor w, double eps) {
  check_rows(w, "w");
  const int64_t n = w.size(0), d = w.size(1);
  float* Wp = w.data_ptr<float>();
  const float floor = static_cast<float>(eps);
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* x = Wp + r * d;
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) sq += x[j] * x[j];
      const float scale = 1.f / std::max(std::sqrt(sq), floor);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) x[j] *= scale;
    }
  });
  return w;
}

// x . y over n floats; four independent accumulators hide the FMA latency (one chain is latency-bound).
inline float dot_product(const float* x, const float* y, int64_t n) {
  int64_t j = 0;
  float tail = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; j + 64 <= n; j += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(y + j + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 32), _mm512_loadu_ps(y + j + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 48), _mm512_loadu_ps(y + j + 48), a3);
  }
  for (; j + 16 <= n; j += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j), a0);
  tail = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
  for (; j < n; ++j) tail += x[j] * y[j];
  return tail;
}

// The k largest exact pre-activations x[r] . W[c] + bias[c] among each row's candidate latents cand[r]
// (a bf16 screen's top k + margin), in no particular order: the bf16 matmul decides which few latents
// are worth an fp32 dot product, and the kept values and their ranking are fp32.
std::tuple<at::Tensor, at::Tensor> rerank_exact(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                                                const at::Tensor& cand, int64_t k) {
  check_rows(x, "x");
  check_rows(w, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "x and w must have the same width");
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.is_contiguous() &&
                  bias.size(0) == w.size(0), "bias: a contiguous float32 vector with one entry per row of w");
  TORCH_CHECK(cand.device().is_cpu() && cand.scalar_type() == at::kLong && cand.dim() == 2 && cand.is_contiguous() &&
                  cand.size(0) == x.size(0), "cand: a contiguous int64 (rows of x, m) tensor");
  const int64_t n = x.size(0), d = x.size(1), m = cand.size(1), D = w.size(0);
  TORCH_CHECK(k >= 1 && k <= m, "k must be between 1 and the number of candidates");
  TORCH_CHECK(n == 0 || (cand.min().item<int64_t>() >= 0 && cand.max().item<int64_t>() < D), "candidate latent out of range");
  auto values = at::empty({n, k}, x.options());
  auto cols = at::empty({n, k}, cand.options());
  const float* X = x.data_ptr<float>();
  const float* Wp = w.data_ptr<float>();
  const float* B = bias.data_ptr<float>();
  const int64_t* Cd = cand.data_ptr<int64_t>();
  float* V = values.data_ptr<float>();
  int64_t* C = cols.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> exact(m);
    std::vector<int64_t> order(m);
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = X + r * d;
      const int64_t* cr = Cd + r * m;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t c = cr[i];
        const float dot = dot_product(xr, Wp + c * d, d);
        exact[i] = B[c] == -INF ? -INF : dot + B[c];
      }
      std::iota(order.begin(), order.end(), int64_t{0});
      if (m > k)
        std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                         [&](int64_t a, int64_t c) { return ranks_above(exact[a], exact[c]); });
      for (int64_t i = 0; i < k; ++i) {
        V[r * k + i] = exact[order[i]];
        C[r * k + i] = cr[order[i]];
      }
    }
  });
  return {values, cols};
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(saescope_cpu, m) {
  m.def("topk_bias(Tensor pre, Tensor bias, int k) -> (Tensor, Tensor)");
  m.def("project_rows_(Tensor(a!) grad, Tensor w) -> Tensor(a!)");
  m.def("normalize_rows_(Tensor(a!) w, float eps) -> Tensor(a!)");
  m.def("rerank_exact(Tensor x, Tensor w, Tensor bias, Tensor cand, int k) -> (Tensor, Tensor)");
  m.def("has_avx512() -> bool", &has_avx512);
  m.impl("topk_bias", c10::DispatchKey::CPU, TORCH_FN(topk_bias));
  m.impl("rerank_exact", c10::DispatchKey::CPU, TORCH_FN(rerank_exact));
  m.impl("project_rows_", c10::DispatchKey::CPU, TORCH_FN(project_rows_));
  m.impl("normalize_rows_", c10::DispatchKey::CPU, TORCH_FN(normalize_rows_));
}
