// saescope's CPU kernels: the per-row passes that torch runs as several full sweeps over a
// (tokens x d_sae) or (d_sae x d_model) matrix, done in one sweep each. Compiled once per machine
// by saescope/sae/cpu_kernels.py (torch.utils.cpp_extension, -march=native); every op has a
// pure-torch twin there, used when no compiler is at hand, and the tests compare the two.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
constexpr float INF = std::numeric_limits<float>::infinity();
constexpr int64_t BLOCK = 32;  // measured: 32 beats 16 (fewer maxima to rank, few extra candidates)
constexpr int64_t AHEAD = 4;  // a gather asks for the row of the pair this far ahead (measured: 1.2x over none in fp32)

inline float nan_as_inf(float x) { return x != x ? INF : x; }

// pre + bias, where a bias of -inf excludes the column whatever pre holds (AuxK's mask of live latents:
// +inf + -inf would be NaN, which ranks first). bf16 widens to float exactly.
template <typename E>
inline float biased(const E* row, const float* B, int64_t j) { return B[j] == -INF ? -INF : static_cast<float>(row[j]) + B[j]; }

// torch.topk's order: NaN above everything, +inf included.
inline bool ranks_above(float a, float b) {
  const bool na = a != a, nb = b != b;
  return na != nb ? na : a > b;
}

// Asks for the n elements at row (a gathered row: random, so the hardware prefetcher cannot guess it).
template <typename E>
inline void prefetch_row(const E* row, int64_t n) {
  for (int64_t j = 0; j < n; j += 64 / static_cast<int64_t>(sizeof(E)))
    __builtin_prefetch(row + j, 0, 3);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is a float's top 16 bits: widening is a shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

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
#if defined(__AVX512F__)
// A float's bits as an int32 that orders like the float (NaN excepted): negative floats have their magnitude bits flipped.
inline __m512i order_key(__m512i bits) { return _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(0x7fffffff))); }

// A value t of m (n floats, n a multiple of 16, no NaN) with k <= count(m >= t) <= k + slack: a binary search on the
// order keys between the smallest and the largest, each probe counting with n / 16 vector compares, that stops at the
// first probe in that band (slack 0: the k-th largest itself, the same value as nth_element, without its mispredicted
// branches, which cost more than reading the row). `keys`: scratch for n / 16 vectors (the caller's, reused per row).
inline float value_ranked16(const float* m, int64_t n, int64_t k, int64_t slack, __m512i* keys) {
  __m512i low = _mm512_set1_epi32(std::numeric_limits<int32_t>::max()), high = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  for (int64_t v = 0; v < n / 16; ++v) {
    keys[v] = order_key(_mm512_castps_si512(_mm512_loadu_ps(m + 16 * v)));
    low = _mm512_min_epi32(low, keys[v]);
    high = _mm512_max_epi32(high, keys[v]);
  }
  int64_t lo = _mm512_reduce_min_epi32(low), hi = _mm512_reduce_max_epi32(high);  // count(>= lo) = n >= k
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    const __m512i probe = _mm512_set1_epi32(static_cast<int32_t>(mid));
    int64_t count = 0;
    for (int64_t v = 0; v < n / 16; ++v) count += __builtin_popcount(_mm512_cmpge_epi32_mask(keys[v], probe));
    if (count >= k) {
      lo = mid;
      if (count <= k + slack) break;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t key = static_cast<int32_t>(lo);
  const int32_t bits = key ^ ((key >> 31) & 0x7fffffff);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
#endif

#if defined(__AVX512F__)
template <bool Masked>
inline __m512 biased16(__m512 pre, const float* b) {
  return Masked ? add_bias(pre, _mm512_loadu_ps(b)) : _mm512_add_ps(pre, _mm512_loadu_ps(b));
}

// One row of the strided path (d = nb * BLOCK, nb a multiple of 16): group g is the columns g, g + nb, g + 2 nb, ...,
// so the groups' maxima are nb / 16 vectors, each a running max kept in a register over the row (no horizontal
// reduction per group); a threshold T below which none of the k largest can lie (value_ranked16 over the maxima); the
// candidates >= T (and any NaN) compressed out of each vector without a branch; the k largest of them by the same
// vector search. Scratch: maxima (nb), cand_v and cand_c (d + 16 each), keys (d / 16 + 1). False, with nothing written, when the row holds
// a NaN (the caller ranks it as torch does).
template <typename E, bool Masked>
bool strided_top_k(const E* row, const float* B, int64_t d, int64_t nb, int64_t k, float* maxima, float* cand_v,
                   int32_t* cand_c, __m512i* keys, float* V, int64_t* C) {
  // No NaN test here: a NaN can only make a maximum wrong, and every NaN of the row is a candidate below, where the
  // row is handed back
  for (int64_t v = 0; v < nb; v += 16) {
    __m512 acc = _mm512_set1_ps(-INF);
    for (int64_t c = v; c < d; c += nb) acc = _mm512_max_ps(acc, biased16<Masked>(load16(row + c), B + c));
    _mm512_storeu_ps(maxima + v, acc);
  }
  // any T with at least k group maxima >= T bounds the k largest from below: a few more than k (slack) cost a few
  // candidates and save most of an exact search's probes
  const __m512 T = _mm512_set1_ps(nb > k ? value_ranked16(maxima, nb, k, k / 4, keys) : -INF);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t m = 0;
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 x = biased16<Masked>(load16(row + j), B + j);
    const __mmask16 hit = _mm512_cmp_ps_mask(x, T, _CMP_NLT_UQ);  // >= T, or NaN
    _mm512_storeu_ps(cand_v + m, _mm512_maskz_compress_ps(hit, x));
    _mm512_storeu_si512(cand_c + m, _mm512_maskz_compress_epi32(hit, _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j)))));
    m += __builtin_popcount(hit);
  }
  const int64_t padded = (m + 15) / 16 * 16;
  std::fill(cand_v + m, cand_v + padded, -INF);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < padded; i += 16) {
    const __m512 x = _mm512_loadu_ps(cand_v + i);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  }
  if (nan) return false;
  const float t = value_ranked16(cand_v, padded, k, 0, keys);  // m >= k: the k-th largest candidate (or a value just above it)
  int64_t out = 0;
  for (int64_t i = 0; i < m && out < k; ++i)
    if (cand_v[i] > t) {
      V[out] = cand_v[i];
      C[out++] = cand_c[i];
    }
  for (int64_t i = 0; i < m && out < k; ++i)
    if (cand_v[i] == t) {
      V[out] = cand_v[i];
      C[out++] = cand_c[i];
    }
  return true;
}
#endif

template <typename E>  // pre's element type
void topk_bias_rows(const at::Tensor& pre, const at::Tensor& bias, int64_t k, at::Tensor& values, at::Tensor& cols) {
  const int64_t n = pre.size(0), d = pre.size(1);
  const E* P = pre.data_ptr<E>();
  const float* B = bias.data_ptr<float>();
  float* V = values.data_ptr<float>();
  int64_t* C = cols.data_ptr<int64_t>();
  const int64_t nb = (d + BLOCK - 1) / BLOCK;
#if defined(__AVX512F__)
  // strided_top_k where the width allows (1.5x faster than the blocked groups on 9,216 columns, before its
  // branch-free candidates), the blocked groups elsewhere and for rows with a NaN
  const bool strided = d == nb * BLOCK && nb % 16 == 0;
#else
  const bool strided = false;
#endif
  // a bias of -inf (AuxK's mask) needs a compare and a blend per vector; a bias without one, a plain add
  const bool masked = std::any_of(B, B + d, [](float b) { return b == -INF; });
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> maxima(nb), scratch(nb), cand_v;
    std::vector<int64_t> cand_c, order;
    cand_v.reserve(4 * k);
    cand_c.reserve(4 * k);
#if defined(__AVX512F__)
    std::vector<float> strided_v(strided ? d + 16 : 0);
    std::vector<int32_t> strided_c(strided ? d + 16 : 0);
    std::vector<__m512i> strided_keys(strided ? d / 16 + 1 : 0);
#endif
    auto threshold = [&]() {  // the k-th largest group maximum (NaN counted as +inf), or -inf with k groups or fewer
      if (nb <= k) return -INF;
      std::copy(maxima.begin(), maxima.end(), scratch.begin());
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
      return scratch[k - 1];
    };
    auto take = [&](const E* row, int64_t j, float T) {
      const float x = biased(row, B, j);
      if (x >= T || x != x) {
        cand_v.push_back(x);
        cand_c.push_back(j);
      }
    };
#if defined(__AVX512F__)
    auto take16 = [&](const E* row, int64_t j, __m512 T) {
      const __m512 v = masked ? biased16<true>(load16(row + j), B + j) : biased16<false>(load16(row + j), B + j);
      __mmask16 hit = _mm512_cmp_ps_mask(v, T, _CMP_NLT_UQ);  // >= T, or NaN
      while (hit) {
        const int t = __builtin_ctz(hit);
        hit &= hit - 1;
        cand_v.push_back(biased(row, B, j + t));
        cand_c.push_back(j + t);
      }
    };
#endif
    auto blocked_row = [&](const E* row) {  // group b is the contiguous columns [b BLOCK, (b + 1) BLOCK)
      int64_t b = 0;
#if defined(__AVX512F__)
      for (; (b + 1) * BLOCK <= d; ++b) {
        const E* p = row + b * BLOCK;
        const float* q = B + b * BLOCK;
        const __m512 v = add_bias(load16(p), _mm512_loadu_ps(q));
        const __m512 u = add_bias(load16(p + 16), _mm512_loadu_ps(q + 16));
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(u, u, _CMP_UNORD_Q);
        maxima[b] = nan ? INF : _mm512_reduce_max_ps(_mm512_max_ps(v, u));
      }
#endif
      for (; b < nb; ++b) {
        float m = -INF;
        for (int64_t j = b * BLOCK, e = std::min(j + BLOCK, d); j < e; ++j) m = std::max(m, nan_as_inf(biased(row, B, j)));
        maxima[b] = m;
      }
      const float T = threshold();
      for (b = 0; b < nb; ++b) {
        if (!(maxima[b] >= T)) continue;
        int64_t j = b * BLOCK;
        const int64_t e = std::min(j + BLOCK, d);
#if defined(__AVX512F__)
        for (; j + 16 <= e; j += 16) take16(row, j, _mm512_set1_ps(T));
#endif
        for (; j < e; ++j) take(row, j, T);
      }
    };
    for (int64_t r = lo; r < hi; ++r) {
      const E* row = P + r * d;
      cand_v.clear();
      cand_c.clear();
#if defined(__AVX512F__)
      if (strided && (masked ? strided_top_k<E, true>(row, B, d, nb, k, maxima.data(), strided_v.data(), strided_c.data(), strided_keys.data(), V + r * k, C + r * k)
                             : strided_top_k<E, false>(row, B, d, nb, k, maxima.data(), strided_v.data(), strided_c.data(), strided_keys.data(), V + r * k, C + r * k)))
        continue;
#endif
      blocked_row(row);
      const int64_t m = static_cast<int64_t>(cand_v.size());
      order.resize(m);
      std::iota(order.begin(), order.end(), int64_t{0});
      if (m > k)
        std::nth_element(order.begin(), order.begin() + (k - 1), order.end(),
                         [&](int64_t a, int64_t c) { return ranks_above(cand_v[a], cand_v[c]); });
      for (int64_t i = 0; i < k; ++i) {
        V[r * k + i] = cand_v[order[i]];
        C[r * k + i] = cand_c[order[i]];
      }
    }
  });
}

// pre: float32, or bf16 (a bf16 matmul's output read as is, so no float32 copy of tokens x d_sae is written);
// the values come back as float32 either way.
std::tuple<at::Tensor, at::Tensor> topk_bias(const at::Tensor& pre, const at::Tensor& bias, int64_t k) {
  TORCH_CHECK(pre.device().is_cpu() && (pre.scalar_type() == at::kFloat || pre.scalar_type() == at::kBFloat16) &&
                  pre.dim() == 2 && pre.is_contiguous(), "pre: a contiguous 2-d float32 or bfloat16 CPU tensor is needed");
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.is_contiguous() &&
                  bias.size(0) == pre.size(1), "bias: a contiguous float32 vector as wide as pre");
  const int64_t n = pre.size(0), d = pre.size(1);
  TORCH_CHECK(k >= 1 && k <= d, "k must be between 1 and the row width");
  auto values = at::empty({n, k}, pre.options().dtype(at::kFloat));
  auto cols = at::empty({n, k}, pre.options().dtype(at::kLong));
  if (pre.scalar_type() == at::kFloat)
    topk_bias_rows<float>(pre, bias, k, values, cols);
  else
    topk_bias_rows<at::BFloat16>(pre, bias, k, values, cols);
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

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(), name, ": a contiguous int64 CPU tensor");
}

// Whether every index lies in [0, rows): one pass, vectorised (min()/max() tensors cost 10x more, a third of a gather).
bool in_range(const int64_t* I, int64_t n, int64_t rows) {
  int64_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<int64_t>(static_cast<uint64_t>(I[i]) >= static_cast<uint64_t>(rows));
  return bad == 0;
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
  TORCH_CHECK(in_range(cand.data_ptr<int64_t>(), cand.numel(), D), "candidate latent out of range");
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


// x . y over n floats, y float32 or bf16 (accumulated in fp32).
inline float dot_any(const float* x, const float* y, int64_t n) { return dot_product(x, y, n); }
inline float dot_any(const float* x, const at::BFloat16* y, int64_t n) {
  int64_t j = 0;
  float tail = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; j + 32 <= n; j += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), load16(y + j), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), load16(y + j + 16), a1);
  }
  for (; j + 16 <= n; j += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), load16(y + j), a0);
  tail = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; j < n; ++j) tail += x[j] * static_cast<float>(y[j]);
  return tail;
}

// out += w * row over n floats, row float32 or bf16.
inline void axpy_any(float* out, float w, const float* row, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += w * row[j];
}
inline void axpy_any(float* out, float w, const at::BFloat16* row, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(w);
  for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, _mm512_fmadd_ps(wv, load16(row + j), _mm512_loadu_ps(out + j)));
#endif
  for (; j < n; ++j) out[j] += w * static_cast<float>(row[j]);
}

void check_table(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) && t.dim() == 2 &&
                  t.is_contiguous(), "table: a contiguous 2-d float32 or bfloat16 CPU tensor is needed");
}

#if defined(__AVX512F__)
// Columns [c0, c0 + 16 V) of one bag, summed in V registers: each pair's row is read once and the sum is
// written once (accumulating in memory costs a load and a store per FMA, and made the gather no faster in bf16).
// The first pass over a bag (c0 = 0) asks for whole rows AHEAD pairs on, across bags (`last`: the pairs' end), so the
// later column passes find them in cache and a small bag (a latent's ~20 tokens) does not start cold.
template <int V, typename E>
inline void bag_columns(float* o, const E* Tb, int64_t d, const int64_t* R, const float* Wt, int64_t p0, int64_t p1,
                        int64_t c0, int64_t last) {
  __m512 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    if (c0 == 0 && p + AHEAD < last) prefetch_row(Tb + R[p + AHEAD] * d, d);  // random rows: fetch a later pair's now
    const __m512 w = _mm512_set1_ps(Wt[p]);
    const E* row = Tb + R[p] * d + c0;
    for (int v = 0; v < V; ++v) acc[v] = _mm512_fmadd_ps(w, load16(row + 16 * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_storeu_ps(o + c0 + 16 * v, acc[v]);
}
#endif

template <typename E>
void bags_of(const at::Tensor& table, const int64_t* R, const float* Wt, const int64_t* O, int64_t bags, float* out) {
  const int64_t d = table.size(1);
  const E* Tb = table.data_ptr<E>();
  at::parallel_for(0, bags, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      float* o = out + b * d;
      int64_t c = 0;
#if defined(__AVX512F__)
      const int64_t last = O[hi];
      for (; c + 192 <= d; c += 192) bag_columns<12>(o, Tb, d, R, Wt, O[b], O[b + 1], c, last);
      for (; c + 64 <= d; c += 64) bag_columns<4>(o, Tb, d, R, Wt, O[b], O[b + 1], c, last);
      for (; c + 16 <= d; c += 16) bag_columns<1>(o, Tb, d, R, Wt, O[b], O[b + 1], c, last);
#endif
      std::fill(o + c, o + d, 0.f);
      for (int64_t p = O[b]; c < d && p < O[b + 1]; ++p) axpy_any(o + c, Wt[p], Tb + R[p] * d + c, d - c);
    }
  });
}

// out[b] = sum over p in [offsets[b], offsets[b + 1]) of weights[p] * table[rows[p]]: (bags, d) float32, from a
// float32 or bf16 table (read as is, accumulated in fp32). The sparse decoder, its input's gradient and the weight
// gradients grouped by latent are one call each; a bf16 table halves the bytes the gathers read.
at::Tensor weighted_bags(const at::Tensor& table, const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& offsets) {
  check_table(table);
  check_index(rows, "rows");
  TORCH_CHECK(in_range(rows.data_ptr<int64_t>(), rows.numel(), table.size(0)), "rows: index out of range");
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  weights.numel() == rows.numel(), "weights: a contiguous float32 tensor, one per row index");
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.size(0) >= 1, "offsets: a contiguous int64 vector, one more than the bags");
  const int64_t bags = offsets.size(0) - 1;
  const int64_t* O = offsets.data_ptr<int64_t>();
  TORCH_CHECK(O[0] == 0 && O[bags] == rows.numel(), "offsets must run from 0 to the number of rows");
  for (int64_t b = 0; b < bags; ++b) TORCH_CHECK(O[b] <= O[b + 1], "offsets must not decrease");
  auto out = at::empty({bags, table.size(1)}, table.options().dtype(at::kFloat));
  if (table.scalar_type() == at::kFloat)
    bags_of<float>(table, rows.data_ptr<int64_t>(), weights.data_ptr<float>(), O, bags, out.data_ptr<float>());
  else
    bags_of<at::BFloat16>(table, rows.data_ptr<int64_t>(), weights.data_ptr<float>(), O, bags, out.data_ptr<float>());
  return out;
}

template <typename E>
void dots_of(const at::Tensor& x, const at::Tensor& table, const at::Tensor& idx, float* out) {
  const int64_t n = idx.size(0), k = idx.size(1), d = x.size(1);
  const float* X = x.data_ptr<float>();
  const E* Tb = table.data_ptr<E>();
  const int64_t* I = idx.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    const int64_t first = lo * k, last = hi * k;  // pairs, in order
    for (int64_t q = first; q < last; ++q) {
      if (q + AHEAD < last) prefetch_row(Tb + I[q + AHEAD] * d, d);
      out[q] = dot_any(X + (q / k) * d, Tb + I[q] * d, d);
    }
  });
}

// out[r, s] = x[r] . table[idx[r, s]]: (n, k) float32, the table float32 or bf16 (the gradient of a sparse
// decoder's output with respect to its code's values).
at::Tensor gathered_dots(const at::Tensor& x, const at::Tensor& table, const at::Tensor& idx) {
  check_rows(x, "x");
  check_table(table);
  TORCH_CHECK(x.size(1) == table.size(1), "x and table must have the same width");
  check_index(idx, "idx");
  TORCH_CHECK(in_range(idx.data_ptr<int64_t>(), idx.numel(), table.size(0)), "idx: index out of range");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0), "idx: (rows of x, k)");
  auto out = at::empty({idx.size(0), idx.size(1)}, x.options());
  if (table.scalar_type() == at::kFloat)
    dots_of<float>(x, table, idx, out.data_ptr<float>());
  else
    dots_of<at::BFloat16>(x, table, idx, out.data_ptr<float>());
  return out;
}

// The pairs of a code grouped by latent: order (the pairs' positions, latent by latent, each latent's in increasing
// order: a stable counting sort) and offsets (d_sae + 1: where each latent's pairs start). Two passes over the pairs,
// against torch.argsort's comparison sort (8 ms for 204,800 pairs on one core).
std::tuple<at::Tensor, at::Tensor> group_by_latent(const at::Tensor& indices, int64_t d_sae) {
  check_index(indices, "indices");
  const int64_t n = indices.numel();
  const int64_t* I = indices.data_ptr<int64_t>();
  TORCH_CHECK(in_range(I, n, d_sae), "indices: latent out of range");
  auto offsets = at::zeros({d_sae + 1}, indices.options());
  auto order = at::empty({n}, indices.options());
  int64_t* O = offsets.data_ptr<int64_t>();
  int64_t* R = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) ++O[I[i] + 1];
  for (int64_t j = 0; j < d_sae; ++j) O[j + 1] += O[j];
  std::vector<int64_t> next(O, O + d_sae);
  for (int64_t i = 0; i < n; ++i) R[next[I[i]]++] = i;
  return {order, offsets};
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
  m.def("weighted_bags(Tensor table, Tensor rows, Tensor weights, Tensor offsets) -> Tensor");
  m.def("gathered_dots(Tensor x, Tensor table, Tensor idx) -> Tensor");
  m.def("group_by_latent(Tensor indices, int d_sae) -> (Tensor, Tensor)");
  m.def("has_avx512() -> bool", &has_avx512);
  m.impl("topk_bias", c10::DispatchKey::CPU, TORCH_FN(topk_bias));
  m.impl("rerank_exact", c10::DispatchKey::CPU, TORCH_FN(rerank_exact));
  m.impl("project_rows_", c10::DispatchKey::CPU, TORCH_FN(project_rows_));
  m.impl("normalize_rows_", c10::DispatchKey::CPU, TORCH_FN(normalize_rows_));
  m.impl("weighted_bags", c10::DispatchKey::CPU, TORCH_FN(weighted_bags));
  m.impl("gathered_dots", c10::DispatchKey::CPU, TORCH_FN(gathered_dots));
  m.impl("group_by_latent", c10::DispatchKey::CPU, TORCH_FN(group_by_latent));
}
