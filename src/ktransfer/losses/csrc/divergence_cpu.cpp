// ktransfer's CPU kernel for divergences: value, NLL and gradient of every kind in four passes per row, with ATen's
// own SIMD vectors (at::vec::Vectorized<float>).
//
// Built on first use by ktransfer.native (torch.utils.cpp_extension.load); the Python path in
// ktransfer.divergences is the reference and the fallback. Per row r (z = learner logits, u = teacher logits, both
// [V]; s = z / T, t = u / T; p = softmax(s), q = softmax(t)):
//
//   pass 1  max s, max t                                       (the only reads of z and u from memory)
//   pass 2  e_s = exp(s - max s), e_t = exp(t - max t) into row scratch, their sums Z_s, Z_t  (the only exps)
//   pass 3  p = e_s / Z_s, q = e_t / Z_t, log p = s - lse_s, log q = t - lse_t;
//           F = sum_terms weight * f(p, q)  (the value), W = sum_terms weight * p df/dp;  C = sum_V W
//   pass 4  grad = (W - p C) div_coef / T  +  nll_coef (p1 - eps / V) - (1 - eps) nll_coef [y], written with
//           non-temporal stores; a bfloat16/float16 gradient is rounded once from registers, 32 entries at a time
//
// (p1 = softmax(z): p itself when T = 1.) With a top-k support S (learner's, teacher's or their union, per term),
// pass 1 also keeps maxima of disjoint subsets of the row, the k largest entries of z and/or u are selected in pass 2
// by a vectorised compare against a threshold that starts at the bound those maxima give (TopkSelector), pass 3 runs
// on the packed entries of S only, and pass 4 adds the sparse w at S; renormalised supports use p~ = p / p(S),
// q~ = q / q(S) and leave the gradient on S only. With a tail, each top-k term adds one outcome "the rest of V" with
// p_rest = sum of e_s outside S / Z_s (summed over the rest, not taken as 1 - p(S), which cancels as p(S) -> 1; the
// teacher's e_t is then kept in a row of its own), and the gradient f'(p_rest) (p_j p(S) - [j in S] p_j). The
// formulas of f and w per kind are those of ktransfer.losses.chunk_math._value_and_w; docs/divergences.md derives them.
// The last vector of a row is padded with -inf logits, whose p = q = 0 give exactly zero terms. The common single
// kinds and `half` get their own instantiation of pass 3 (no per-vector dispatch); the jsd and skew kinds take one
// table-driven log per entry (log_prob). Row sums are accumulated in float vectors and flushed to double every 64
// vectors. bfloat16/float16 entries are converted to float32 vector by vector as they are read. One thread per row
// (at::parallel_for over rows), so the results do not depend on the number of threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kFlush = 64;  // vectors accumulated in float before a flush into double

enum Kind : int64_t { FORWARD_KL = 0, REVERSE_KL = 1, JSD = 2, SKEW_FORWARD_KL = 3, SKEW_REVERSE_KL = 4, TVD = 5 };

inline double hsum(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  double s = 0.0;
  for (int64_t i = 0; i < Vec::size(); ++i) s += buf[i];
  return s;
}

inline float hmax(const Vec& v) {
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < Vec::size(); ++i) m = std::max(m, buf[i]);
  return m;
}

// exp(r) for x = n log 2 + r, |r| <= log(2) / 2 (Cephes' expf: n = floor(x log2 e + 1/2), log 2 in two parts, a
// degree-6 polynomial, ~1 ulp); n is returned beside it, for the caller's scaling by 2^n.
inline Vec exp_reduced(const Vec& x, Vec& n) {
  n = at::vec::fmadd(x, Vec(1.44269504088896341f), Vec(0.5f)).floor();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec y(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = at::vec::fmadd(y, r, Vec(c));
  return at::vec::fmadd(y, r * r, r + Vec(1.0f));
}

// exp, inlined: exp_reduced scaled by 2^n. AVX-512: scalef, whose zero-masking gives exactly 0 below log(FLT_MIN)
// (-inf included, so that p = 0 where a logit is -inf) without clamps; NaN propagates through every step; large
// inputs overflow to inf. 15 instructions (dropping the clamps and a NaN blend took 10% off the bf16 sweep). AVX2: 2^n
// made from its exponent bits (n clamped to 128: inputs above 88.37 give inf, where callers pass x <= 0), the lanes
// below log(FLT_MIN) cleared by a mask. Every entry of a row takes one exp per model: inlining it saves SLEEF's
// out-of-line call per vector, across which every live vector spills on AVX2 (all ymm registers are caller-saved;
// measured: 21% off a top-k call, see docs/benchmarks.md). Elsewhere: Vectorized::exp() (SLEEF, 1 ulp).
inline Vec fast_exp(const Vec& xv) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 under = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654475f), _CMP_LT_OQ);
  Vec n;
  const Vec y = exp_reduced(xv, n);
  return Vec(_mm512_maskz_scalef_ps(static_cast<__mmask16>(~under), y, n));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 under = _mm256_cmp_ps(xv, _mm256_set1_ps(-87.33654475f), _CMP_LT_OQ);
  Vec n;
  const Vec y = exp_reduced(xv, n);
  // 2^n for n in [-126, 128] (below: masked to 0; 128: the bits of inf); NaN: y is NaN, whatever 2^n is
  const __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_min_ps(n, _mm256_set1_ps(128.0f))),
                                     _mm256_set1_epi32(127));
  return Vec(_mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)))));
#else
  return xv.exp();
#endif
}

// log x for x in [FLT_MIN, 3/2) (a probability, or a mixture of two; callers clamp to FLT_MIN), one per entry in the
// jsd and skew kinds. Table-driven: x = m 2^k with m in [3/4, 3/2) (k + 1 where m < 1). The top 4 bits of m's
// mantissa index 16 intervals (8 of width 1/16 in [1, 3/2), 8 of width 1/32 in [3/4, 1)) with midpoints c_i; two
// 16-entry tables held in registers give r_i = 1/c_i and -log r_i (both rounded to float, -log r_i computed in
// double from the rounded r_i). Then f = m r_i - 1 (|f| < 1/33, one rounding in the fma), log m = -log r_i +
// log1p(f) with log1p to f^5 (truncation < 2e-10), log x = log m + k log 2 (log 2 in two parts). Error <= half an
// ulp of the result + 5e-8 over the whole range, and <= 1e-8 within e^+-0.1 of 1 (tests/unit/test_native.py checks it
// against float64 on random float bit patterns), in 15 instructions on AVX-512 (getmant/getexp, one permute per
// table) where a 1-ulp Cephes logf takes 24 (measured: jsd 17.2 -> 15.2 ms, bf16 2048 x 8000). AVX2: m and k from
// the bits (m >= 3/2 halved), each table as two 8-entry permutes and a blend, NaN kept by an unordered compare; it
// replaced SLEEF's out-of-line 3.5-ulp log. Elsewhere: Vectorized::log().
alignas(64) constexpr float kLogR[16] = {
    0.969696999f, 0.914285719f, 0.864864886f, 0.820512831f, 0.780487776f, 0.744186044f, 0.711111128f, 0.680851042f,
    1.30612242f,  1.25490201f,  1.20754719f,  1.16363633f,  1.12280703f,  1.08474576f,  1.04918027f,  1.01587307f};
alignas(64) constexpr float kNegLogR[16] = {
    0.030771628f,  0.0896121562f, 0.145181984f,  0.19782573f,   0.247836202f,  0.295464218f,  0.340926558f,
    0.384411722f,  -0.267062753f, -0.227057487f, -0.188591182f, -0.151549861f, -0.115831822f, -0.0813456401f,
    -0.0480091646f, -0.0157484151f};

// log x from x = m 2^k and m's table entries r = r_i, neg_log_r = -log r_i (see log_prob).
inline Vec log_from_table(const Vec& m, const Vec& k, const Vec& r, const Vec& neg_log_r) {
  const Vec f = at::vec::fmsub(m, r, Vec(1.0f));
  Vec y = at::vec::fmadd(f, Vec(0.2f), Vec(-0.25f));
  y = at::vec::fmadd(y, f, Vec(1.0f / 3.0f));
  y = at::vec::fmadd(y, f, Vec(-0.5f));
  y = at::vec::fmadd(y, f, Vec(1.0f));
  y = at::vec::fmadd(y, f, at::vec::fmadd(k, Vec(-2.12194440e-4f), neg_log_r));
  return at::vec::fmadd(k, Vec(0.693359375f), y);
}

inline Vec log_prob(const Vec& xv) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 m = _mm512_getmant_ps(xv, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);  // [3/4, 3/2)
  __m512 k = _mm512_getexp_ps(xv);
  k = _mm512_mask_add_ps(k, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), k, _mm512_set1_ps(1.0f));
  const __m512i idx = _mm512_srli_epi32(_mm512_castps_si512(m), 19);  // permutexvar reads its low 4 bits
  return log_from_table(Vec(m), Vec(k), Vec(_mm512_permutexvar_ps(idx, _mm512_load_ps(kLogR))),
                        Vec(_mm512_permutexvar_ps(idx, _mm512_load_ps(kNegLogR))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i bits = _mm256_castps_si256(xv);
  const __m256i idx = _mm256_and_si256(_mm256_srli_epi32(bits, 19), _mm256_set1_epi32(15));  // top 4 mantissa bits
  const __m256i halve = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));  // m in [3/2, 2): m / 2, k + 1 (-1 lanes)
  const __m256i m_bits = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                         _mm256_add_epi32(_mm256_set1_epi32(0x3f800000),
                                                          _mm256_and_si256(halve, _mm256_set1_epi32(-0x00800000))));
  const __m256i k_int = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)), halve);
  const __m256 high = _mm256_castsi256_ps(halve);
  const auto lookup = [&](const float* table) {  // permutevar8x32 reads the low 3 bits of idx
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(table), idx),
                            _mm256_permutevar8x32_ps(_mm256_load_ps(table + 8), idx), high);
  };
  const Vec y = log_from_table(Vec(_mm256_castsi256_ps(m_bits)), Vec(_mm256_cvtepi32_ps(k_int)), Vec(lookup(kLogR)),
                               Vec(lookup(kNegLogR)));
  return Vec(_mm256_or_ps(y, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q)));  // NaN in, NaN out
#else
  return xv.log();
#endif
}

// where(mask, x, 0): mask lanes are all-ones or all-zeros bit patterns (the result of a comparison).
inline Vec keep(const Vec& mask, const Vec& x) { return x & mask; }

// where(c > 0 or c is NaN, x, 0), with one masked move on AVX-512: the 0 log 0 = 0 convention, without dropping a NaN
// (a NaN logit makes its row's value NaN, as on the Python path).
inline Vec keep_pos(const Vec& c, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_NLE_UQ), x));
#else
  return x & ((c > Vec(0.0f)) | c.isnan());
#endif
}

// a / b for b in [FLT_MIN, 1]: AVX-512 reciprocal estimate (rel. error 2^-14) and one Newton step (~2^-28), a
// third of the cost of a division; elsewhere a / b.
inline Vec div_prob(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r0 = _mm512_rcp14_ps(b);
  const __m512 r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(b, r0, _mm512_set1_ps(1.0f)), r0);
  return Vec(_mm512_mul_ps(a, r));
#else
  return a / b;
#endif
}

enum Support : int64_t { FULL = -1, LEARNER = 0, TEACHER = 1, UNION = 2 };

struct Term {
  int64_t kind;
  float weight;
  int64_t support;
};

struct Options {
  std::vector<Term> terms;
  float inv_T, T, beta, alpha, eps;
  int64_t top_k;     // 0: every term covers all of V
  bool renormalize;  // top-k terms: renormalise p and q over S
  bool tail;         // top-k terms: one more outcome, the rest of V (excludes renormalize)
};

// Accumulates weight * f into F and weight * w into W for one term of kind K, at one vector of positions.
template <int64_t K>
inline void term_k(const Options& o, const Vec& wt, const Vec& p, const Vec& q, const Vec& logp, const Vec& logq,
                   Vec& F, Vec& W) {
  const Vec zero(0.0f), tiny(FLT_MIN);
  if constexpr (K == FORWARD_KL) {  // f = q (log q - log p), w = -q
    F = F + wt * keep_pos(q, q * (logq - logp));
    W = W - wt * q;
  } else if constexpr (K == REVERSE_KL) {  // f = p (log p - log q), w = f + p
    const Vec f = keep_pos(p, p * (logp - logq));
    F = F + wt * f;
    W = W + wt * (f + p);
  } else if constexpr (K == JSD) {  // m = b q + (1-b) p; f = b q log(q/m) + (1-b) p log(p/m), w = (1-b) p log(p/m)
    const Vec b(o.beta), nb(1.0f - o.beta);
    const Vec logm = log_prob(at::vec::maximum(b * q + nb * p, tiny));
    const Vec fp = keep_pos(p, p * (logp - logm));
    const Vec fq = keep_pos(q, q * (logq - logm));
    F = F + wt * (b * fq + nb * fp);
    W = W + wt * nb * fp;
  } else if constexpr (K == SKEW_FORWARD_KL) {  // m = a q + (1-a) p; f = q (log q - log m), w = -(1-a) p q / m
    const Vec a(o.alpha), na(1.0f - o.alpha);
    const Vec m = at::vec::maximum(a * q + na * p, tiny);
    F = F + wt * keep_pos(q, q * (logq - log_prob(m)));
    W = W - wt * na * div_prob(p * q, m);
  } else if constexpr (K == SKEW_REVERSE_KL) {  // m = a p + (1-a) q; f = p (log p - log m), w = f + p - a p^2 / m
    const Vec a(o.alpha), na(1.0f - o.alpha);
    const Vec m = at::vec::maximum(a * p + na * q, tiny);
    const Vec f = keep_pos(p, p * (logp - log_prob(m)));
    F = F + wt * f;
    W = W + wt * (f + p - a * div_prob(p * p, m));
  } else {  // TVD: f = |p - q| / 2, w = p sign(p - q) / 2
    const Vec d = p - q, half(0.5f);
    const Vec sign = keep(d > zero, Vec(1.0f)) - keep(d < zero, Vec(1.0f));
    F = F + wt * half * d.abs();
    W = W + wt * half * p * sign;
  }
}

inline void term_at(const Options& o, const Term& term, const Vec& p, const Vec& q, const Vec& logp, const Vec& logq,
                    Vec& F, Vec& W) {
  const Vec wt(term.weight);
  switch (term.kind) {
    case FORWARD_KL: term_k<FORWARD_KL>(o, wt, p, q, logp, logq, F, W); break;
    case REVERSE_KL: term_k<REVERSE_KL>(o, wt, p, q, logp, logq, F, W); break;
    case JSD: term_k<JSD>(o, wt, p, q, logp, logq, F, W); break;
    case SKEW_FORWARD_KL: term_k<SKEW_FORWARD_KL>(o, wt, p, q, logp, logq, F, W); break;
    case SKEW_REVERSE_KL: term_k<SKEW_REVERSE_KL>(o, wt, p, q, logp, logq, F, W); break;
    default: term_k<TVD>(o, wt, p, q, logp, logq, F, W); break;
  }
}

inline void terms_at(const Options& o, const Vec& p, const Vec& q, const Vec& logp, const Vec& logq, Vec& F, Vec& W) {
  for (const Term& term : o.terms) term_at(o, term, p, q, logp, logq, F, W);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Logits x[j : j + width] * inv_T of a row of length V as float32 (bf16/fp16 converted on the fly by ATen's vector
// conversions); lanes past V are -inf (p = q = 0 there).
template <typename T>
inline Vec logits_at(const T* x, int64_t j, int64_t V, const Vec& inv_T) {
  if (j + Vec::size() <= V) {
    if constexpr (std::is_same_v<T, float>) {
      return Vec::loadu(x + j) * inv_T;
    } else {
      Vec v;
      at::vec::load_to_float<T>(x + j, v);
      return v * inv_T;
    }
  }
  const int64_t n = V - j;
  alignas(64) float tail[Vec::size()];
  for (int64_t i = 0; i < n; ++i) tail[i] = static_cast<float>(x[j + i]);
  return Vec::set(Vec(kNegInf), Vec::loadu(tail, n) * inv_T, n);
}

// A non-temporal store of one vector to a vector-aligned address: the gradient row goes to memory without first
// reading its cache lines (it is not read again by this kernel, and is far larger than the caches).
inline void stream_store(const Vec& v, float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(out, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(out, v);
#else
  v.store(out);
#endif
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline void store_row(const Vec& v, float* out, int64_t j, int64_t V) {
  if (j + Vec::size() <= V) {
    v.store(out + j);
  } else {
    v.store(out + j, V - j);
  }
}

constexpr int64_t kMaxGroups = 64;  // top-k selection bounds for k up to 64 x the vector width

// How many round-robin groups row_max keeps for a top-k selection of k: about 4k subsets (the k-th largest of 4k
// subset maxima is a tight bound: at k = 256 of 8000, ~300 entries lie above it), at most kMaxGroups x the width;
// 0 (no bound) where that is fewer than k subsets.
inline int64_t topk_groups(int64_t k) {
  const int64_t g = std::min<int64_t>(kMaxGroups, (4 * k + Vec::size() - 1) / Vec::size());
  return g * Vec::size() >= k ? g : 0;
}

// Candidates of a top-k selection, structure of arrays: values and their int32 indices (V < 2^31), with room for
// one vector past the capacity; `scratch` holds cut_topk's order keys.
struct TopkBuffer {
  std::vector<float> val;
  std::vector<int32_t> idx, scratch;
};

// Appends the lanes of v (entries i .. i + width - 1 of the row) that are > thr to the buffer at `count`: one
// compress of values and one of indices on AVX-512, a loop over the set lanes elsewhere.
inline int64_t append_above(const Vec& v, int64_t i, float thr, float* val, int32_t* idx, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 above = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_GT_OQ);
  if (!above) return count;
  const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(i)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  // compress in registers, then a plain store of the whole vector (the buffer has a vector of room past its capacity):
  // the memory form of compress-store is microcoded and slow on AMD Zen 4
  _mm512_storeu_ps(val + count, _mm512_maskz_compress_ps(above, v));
  _mm512_storeu_si512(idx + count, _mm512_maskz_compress_epi32(above, lane));
  return count + __builtin_popcount(above);
#else
  alignas(64) float buf[Vec::size()];
  v.store(buf);
  for (int64_t l = 0; l < Vec::size(); ++l)
    if (buf[l] > thr) {
      val[count] = buf[l];
      idx[count++] = static_cast<int32_t>(i + l);
    }
  return count;
#endif
}

// Flips the magnitude bits of negative values: maps a float's bits to an int32 that orders like the float, and back
// (it is its own inverse).
inline int32_t flip_negative(int32_t i) { return i ^ ((i >> 31) & 0x7fffffff); }

// A float as an int32 that orders like the float.
inline int32_t order_key(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return flip_negative(i);
}

// The float whose order key is `key`.
inline float key_value(int32_t key) {
  const int32_t i = flip_negative(key);
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// The k-th largest of n order keys (1 <= k <= n), by bisection on the key range: at most 32 vectorisable counting
// passes, which over a few thousand int32 cost far less than nth_element's unpredictable branches (at k = 256 of 8000,
// cutting the candidates with nth_element took a third of the sweep).
inline int32_t kth_largest_key(const int32_t* key, int64_t n, int64_t k) {
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, key[i]);
    hi = std::max(hi, key[i]);
  }
  // invariant: at least k keys are >= lo, fewer than k are >= hi + 1
  int64_t lo64 = lo, hi64 = static_cast<int64_t>(hi) + 1;
  while (hi64 - lo64 > 1) {
    const int64_t mid = lo64 + (hi64 - lo64) / 2;
    const int32_t m = static_cast<int32_t>(mid);
    int32_t n_ge = 0;  // int32: the loop vectorises 16 keys at a time
    for (int64_t i = 0; i < n; ++i) n_ge += key[i] >= m;
    (n_ge >= k ? lo64 : hi64) = mid;
  }
  return static_cast<int32_t>(lo64);  // the largest key with >= k keys at or above it: one of the keys
}

// Keeps the k largest of the `count` candidates (ties at the k-th value broken by position, branch-free) and returns
// the k-th largest value.
inline float cut_topk(TopkBuffer& b, int64_t& count, int64_t k) {
  int32_t* key = b.scratch.data();
  for (int64_t i = 0; i < count; ++i) key[i] = order_key(b.val[i]);
  const int32_t kth_key = kth_largest_key(key, count, k);
  int32_t above = 0;
  for (int64_t i = 0; i < count; ++i) above += key[i] > kth_key;
  int64_t ties = k - above, kept = 0;  // how many of the keys equal to the k-th to keep (usually 1: the k-th itself)
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // in place, 16 at a time: the kept lanes are compressed in registers and stored at `kept` <= i, which never
  // reaches past the vector just loaded
  const __m512i vk = _mm512_set1_epi32(kth_key);
  for (; i + 16 <= count; i += 16) {
    const __m512i kv = _mm512_loadu_si512(key + i);
    __mmask16 keep_mask = _mm512_cmpgt_epi32_mask(kv, vk);
    __mmask16 eq = _mm512_cmpeq_epi32_mask(kv, vk);
    while (eq && ties > 0) {  // the first ties-many equal keys
      keep_mask |= eq & static_cast<__mmask16>(-eq);
      eq &= eq - 1;
      --ties;
    }
    const __m512 vals = _mm512_loadu_ps(b.val.data() + i);
    const __m512i idxs = _mm512_loadu_si512(b.idx.data() + i);
    _mm512_storeu_ps(b.val.data() + kept, _mm512_maskz_compress_ps(keep_mask, vals));
    _mm512_storeu_si512(b.idx.data() + kept, _mm512_maskz_compress_epi32(keep_mask, idxs));
    kept += __builtin_popcount(keep_mask);
  }
#endif
  for (; i < count; ++i) {
    const bool gt = key[i] > kth_key, eq = key[i] == kth_key;
    const bool keep_it = gt || (eq && ties > 0);
    ties -= eq && keep_it;
    b.val[kept] = b.val[i];
    b.idx[kept] = b.idx[i];
    kept += keep_it;
  }
  count = kept;
  return key_value(kth_key);
}

// The k largest entries of a row (unordered), fed vector by vector while pass 2 reads the row for its exps, so
// that the selection costs no pass of its own. Entries above a threshold are appended to a buffer (a compress per
// vector); a full buffer (4k, at least 64) is cut back to its k largest (cut_topk) and the threshold rises to the
// k-th. The threshold starts at a lower bound from pass 1 (the k-th largest of row_max's ~4k disjoint-subset maxima,
// for k up to 64 x the vector width), so in a row in random order only slightly more than k entries are ever
// appended (~300 at k = 256 of 8000). Rows with fewer than k entries above -inf are completed with the first other
// indices (as any top-k of tied -inf values).
struct TopkSelector {
  TopkBuffer b;  // the candidates (one row and model at a time)
  int64_t k = 0, cap = 0, count = 0;
  float thr = kNegInf;

  void start(int64_t k_, const float* lanes) {
    k = k_;
    cap = std::max<int64_t>(4 * k, 64);
    count = 0;
    thr = kNegInf;
    b.val.resize(static_cast<size_t>(cap + Vec::size()));
    b.idx.resize(static_cast<size_t>(cap + Vec::size()));
    b.scratch.resize(static_cast<size_t>(std::max(cap + Vec::size(), kMaxGroups * Vec::size())));
    const int64_t groups = topk_groups(k);
    if (lanes && groups > 0) {
      // the k largest of the disjoint-subset maxima are k distinct entries: the row's k-th largest is >= their least
      const int64_t n_lanes = groups * Vec::size();
      int32_t* key = b.scratch.data();
      for (int64_t i = 0; i < n_lanes; ++i) key[i] = order_key(lanes[i]);
      const float bound = key_value(kth_largest_key(key, n_lanes, k));
      if (std::isfinite(bound)) thr = std::nextafter(bound, kNegInf);
    }
  }

  // raw: the row's logits j .. j + width - 1, unscaled (lanes past the row: -inf, never above thr)
  inline void offer(const Vec& raw, int64_t j) {
    count = append_above(raw, j, thr, b.val.data(), b.idx.data(), count);
    if (count >= cap) thr = cut_topk(b, count, k);
  }

  void finish(int64_t n, std::vector<int64_t>& out, std::vector<uint8_t>& mark) {
    if (count > k) cut_topk(b, count, k);
    out.assign(b.idx.begin(), b.idx.begin() + count);
    if (static_cast<int64_t>(out.size()) < k) {
      for (int64_t j : out) mark[j] = 1;
      for (int64_t j = 0; j < n && static_cast<int64_t>(out.size()) < k; ++j)
        if (!mark[j]) out.push_back(j);
      for (int64_t j : out) mark[j] = 0;
    }
  }
};

// max_j x[j] * inv_T (the scale is monotone, so this is max(x) * inv_T); -inf for a row of -inf. With `lanes`, the
// row's vectors are dealt round-robin to `groups` accumulators and lanes[g * width + l] receives the maximum of lane l
// of group g (unscaled): groups x width maxima of disjoint subsets of the row, from which a top-k selection starts.
template <typename T>
inline float row_max(const T* x, int64_t V, float inv_T, float* lanes = nullptr, int64_t groups = 1) {
  const Vec one(1.0f);
  if (!lanes || groups == 1) {
    Vec vm(kNegInf);
    for (int64_t j = 0; j < V; j += Vec::size()) vm = at::vec::maximum(vm, logits_at(x, j, V, one));
    if (lanes) vm.store(lanes);
    return hmax(vm) * inv_T;
  }
  Vec vm[kMaxGroups];
  for (int64_t g = 0; g < groups; ++g) vm[g] = Vec(kNegInf);
  for (int64_t j = 0, g = 0; j < V; j += Vec::size(), g = (g + 1 == groups ? 0 : g + 1))
    vm[g] = at::vec::maximum(vm[g], logits_at(x, j, V, one));
  Vec all(kNegInf);
  for (int64_t g = 0; g < groups; ++g) {
    vm[g].store(lanes + g * Vec::size());
    all = at::vec::maximum(all, vm[g]);
  }
  return hmax(all) * inv_T;
}

// e = exp(x * inv_T - m) over the padded row (np entries; e = nullptr: not stored), returns sum e; m = -inf (a row of
// -inf) is treated as 0. With `sel`, each vector of x is also offered to a top-k selection.
template <typename T>
inline double exp_sum(const T* x, int64_t V, int64_t np, float inv_T, float m, float* e, TopkSelector* sel = nullptr) {
  if (!std::isfinite(m)) m = 0.0f;
  const Vec vm(m), vt(inv_T), one(1.0f);
  Vec acc(0.0f);
  double total = 0.0;
  for (int64_t j = 0, k = 0; j < np; j += Vec::size(), ++k) {
    const Vec raw = logits_at(x, j, V, one);
    if (sel) sel->offer(raw, j);
    const Vec v = fast_exp(raw * vt - vm);
    if (e) v.store(e + j);
    acc = acc + v;
    if (k % kFlush == kFlush - 1) {
      total += hsum(acc);
      acc = Vec(0.0f);
    }
  }
  return total + hsum(acc);
}

// Pass 3 over all of V: F = sum_V sum_terms weight f, C = sum_V W; W overwrites e_t in `eq`. K2 < 0: one term.
// K1 = K2 = -1: any terms, dispatched per vector (kinds other than the common ones and `half`).
template <int64_t K1, int64_t K2, typename T>
void dense_terms(const Options& o, const T* z, const T* u, int64_t V, int64_t np, const float* es, float* eq,
                 float inv_Zs, float inv_Zt, float lse_s, float lse_t, double& F_out, double& C_out) {
  const Vec v_inv_Zs(inv_Zs), v_inv_Zt(inv_Zt), v_lse_s(lse_s), v_lse_t(lse_t), vt(o.inv_T);
  const Vec w1(o.terms[0].weight), w2(o.terms.size() > 1 ? o.terms[1].weight : 0.0f);
  Vec F_acc(0.0f), C_acc(0.0f);
  double F_total = 0.0, C = 0.0;
  for (int64_t j = 0, k = 0; j < np; j += Vec::size(), ++k) {
    const Vec p = Vec::loadu(es + j) * v_inv_Zs;
    const Vec q = Vec::loadu(eq + j) * v_inv_Zt;
    const Vec logp = logits_at(z, j, V, vt) - v_lse_s;
    const Vec logq = logits_at(u, j, V, vt) - v_lse_t;
    Vec F(0.0f), W(0.0f);
    if constexpr (K1 < 0) {
      terms_at(o, p, q, logp, logq, F, W);
    } else {
      term_k<K1>(o, w1, p, q, logp, logq, F, W);
      if constexpr (K2 >= 0) term_k<K2>(o, w2, p, q, logp, logq, F, W);
    }
    F_acc = F_acc + F;
    C_acc = C_acc + W;
    W.store(eq + j);
    if (k % kFlush == kFlush - 1) {
      F_total += hsum(F_acc);
      C += hsum(C_acc);
      F_acc = Vec(0.0f);
      C_acc = Vec(0.0f);
    }
  }
  F_out = F_total + hsum(F_acc);
  C_out = C + hsum(C_acc);
}

template <typename T>
using DenseFn = void (*)(const Options&, const T*, const T*, int64_t, int64_t, const float*, float*, float, float, float,
                         float, double&, double&);

template <typename T>
DenseFn<T> pick_dense(const Options& o) {
  if (o.terms.size() == 1) {
    switch (o.terms[0].kind) {
      case FORWARD_KL: return dense_terms<FORWARD_KL, -1, T>;
      case REVERSE_KL: return dense_terms<REVERSE_KL, -1, T>;
      case JSD: return dense_terms<JSD, -1, T>;
      case SKEW_FORWARD_KL: return dense_terms<SKEW_FORWARD_KL, -1, T>;
      case SKEW_REVERSE_KL: return dense_terms<SKEW_REVERSE_KL, -1, T>;
      default: return dense_terms<TVD, -1, T>;
    }
  }
  if (o.terms.size() == 2 && o.terms[0].kind == FORWARD_KL && o.terms[1].kind == REVERSE_KL)
    return dense_terms<FORWARD_KL, REVERSE_KL, T>;  // half
  return dense_terms<-1, -1, T>;
}

// The sums of a[0:np] and b[0:np] outside S, summed directly over the rest (accurate however much of the sums S
// holds): the entries at S are set to 0 for one pass over both rows and restored after it (S has no repeated index).
// Two accumulators per row, so that the adds are not one chain of dependent additions.
inline std::pair<double, double> rest_sums(float* a, float* b, int64_t np, const std::vector<int64_t>& S,
                                           std::vector<float>& saved) {
  const size_t n = S.size();
  saved.resize(2 * n);
  for (size_t i = 0; i < n; ++i) {
    saved[i] = a[S[i]];
    saved[n + i] = b[S[i]];
    a[S[i]] = b[S[i]] = 0.0f;
  }
  constexpr int64_t w = Vec::size();
  Vec a0(0.0f), a1(0.0f), b0(0.0f), b1(0.0f);
  double sum_a = 0.0, sum_b = 0.0;
  int64_t j = 0;
  for (int64_t k = 0; j + 2 * w <= np; j += 2 * w, ++k) {
    a0 = a0 + Vec::loadu(a + j);
    a1 = a1 + Vec::loadu(a + j + w);
    b0 = b0 + Vec::loadu(b + j);
    b1 = b1 + Vec::loadu(b + j + w);
    if (k % kFlush == kFlush - 1) {
      sum_a += hsum(a0 + a1);
      sum_b += hsum(b0 + b1);
      a0 = a1 = b0 = b1 = Vec(0.0f);
    }
  }
  if (j < np) {  // np is a multiple of the width: one vector left at most
    a0 = a0 + Vec::loadu(a + j);
    b0 = b0 + Vec::loadu(b + j);
  }
  for (size_t i = 0; i < n; ++i) {
    a[S[i]] = saved[i];
    b[S[i]] = saved[n + i];
  }
  return {sum_a + hsum(a0 + a1), sum_b + hsum(b0 + b1)};
}

// The rest of the vocabulary's rows for a tail: e_s = exp(s - max s) and e_t (padded to np), their sums Z_s, Z_t,
// and room for rest_sums' saved entries.
struct RestRows {
  float* es;
  float* et;
  int64_t np;
  double Zs, Zt;
  std::vector<float>* saved;
};

// The tail outcome of one top-k term with support S: adds weight f(p_rest, q_rest) to F
// and returns weight f'(p_rest) (0 where p_rest = 0), whose gradient is f' (p_j p(S) - [j in S] p_j).
inline double tail_term(const Options& o, const Term& term, const RestRows& rest, const std::vector<int64_t>& S,
                        double& F) {
  const auto [sum_s, sum_t] = rest_sums(rest.es, rest.et, rest.np, S, *rest.saved);
  const double p_rest = sum_s / rest.Zs, q_rest = sum_t / rest.Zt;
  alignas(64) float lanes[4][Vec::size()];  // p, q, log p, log q; lane 0: the rest, the others p = q = 0 (zero terms)
  for (int i = 0; i < 4; ++i) std::fill(lanes[i], lanes[i] + Vec::size(), i < 2 ? 0.0f : kNegInf);
  lanes[0][0] = static_cast<float>(p_rest);
  lanes[1][0] = static_cast<float>(q_rest);
  lanes[2][0] = static_cast<float>(std::log(p_rest));
  lanes[3][0] = static_cast<float>(std::log(q_rest));
  Vec f(0.0f), w(0.0f);
  term_at(o, term, Vec::loadu(lanes[0]), Vec::loadu(lanes[1]), Vec::loadu(lanes[2]), Vec::loadu(lanes[3]), f, w);
  F += hsum(f);
  return p_rest > 0.0 ? hsum(w) / p_rest : 0.0;  // w = weight p f'(p)
}

// Value and gradient of the top-k terms at one row. z, u: the row's logits (float32, unscaled); lse_s, lse_t the
// log-normalisers of z / T and u / T. Adds the value to F, sum_S w of non-renormalised terms to C (with a tail, its
// -f'(p_rest) p(S) too), and the sparse w at S (pass 4 scales it by div_coef / T) to `sparse`.
template <typename T>
void topk_terms(const Options& o, const T* z, const T* u, float lse_s, float lse_t,
                const std::vector<int64_t>& idx_l, const std::vector<int64_t>& idx_t, std::vector<uint8_t>& mark,
                std::vector<int64_t>& S, std::vector<float>& pk, const RestRows& rest, double& F, double& C,
                std::vector<std::pair<int64_t, float>>& sparse) {
  for (const Term& term : o.terms) {
    if (term.support == LEARNER) {
      S = idx_l;
    } else if (term.support == TEACHER) {
      S = idx_t;
    } else {  // union: the learner's picks, then the teacher's not among them (duplicates count once)
      S = idx_l;
      for (int64_t j : idx_l) mark[j] = 1;
      for (int64_t j : idx_t)
        if (!mark[j]) S.push_back(j);
      for (int64_t j : idx_l) mark[j] = 0;
    }
    const int64_t n = static_cast<int64_t>(S.size());
    const int64_t kp = (n + Vec::size() - 1) / Vec::size() * Vec::size();
    pk.assign(static_cast<size_t>(kp) * 5, kNegInf);  // log p, log q, p, q, w at S (padding: p = q = 0)
    float *lp = pk.data(), *lq = lp + kp, *pp = lq + kp, *qq = pp + kp, *ww = qq + kp;
    for (int64_t i = 0; i < n; ++i) {
      lp[i] = static_cast<float>(z[S[i]]) * o.inv_T - lse_s;
      lq[i] = static_cast<float>(u[S[i]]) * o.inv_T - lse_t;
    }
    if (o.renormalize) {  // log p~ = log p - log p(S), the same for q
      for (float* l : {lp, lq}) {
        float m = kNegInf;
        for (int64_t i = 0; i < n; ++i) m = std::max(m, l[i]);
        const float m0 = std::isfinite(m) ? m : 0.0f;
        double Z = 0.0;
        for (int64_t i = 0; i < n; ++i) Z += std::exp(l[i] - m0);
        const float lse = m0 + static_cast<float>(std::log(Z));
        for (int64_t i = 0; i < n; ++i) l[i] -= lse;
      }
    }
    for (int64_t j = 0; j < kp; j += Vec::size()) {
      fast_exp(Vec::loadu(lp + j)).store(pp + j);
      fast_exp(Vec::loadu(lq + j)).store(qq + j);
    }
    Vec F_acc(0.0f), W_acc(0.0f);
    for (int64_t j = 0; j < kp; j += Vec::size()) {
      Vec f(0.0f), w(0.0f);
      term_at(o, term, Vec::loadu(pp + j), Vec::loadu(qq + j), Vec::loadu(lp + j), Vec::loadu(lq + j), f, w);
      F_acc = F_acc + f;
      W_acc = W_acc + w;
      w.store(ww + j);
    }
    F += hsum(F_acc);
    const double w_sum = hsum(W_acc);
    if (o.renormalize) {  // the gradient lives on S: w~ - p~ sum_S w~
      for (int64_t i = 0; i < n; ++i) sparse.emplace_back(S[i], ww[i] - pp[i] * static_cast<float>(w_sum));
    } else if (o.tail) {  // f'(p_rest) (p_j p(S) - [j in S] p_j): -f' p(S) joins C, -f' p_j the w at S
      const double g = tail_term(o, term, rest, S, F);
      double p_set = 0.0;
      for (int64_t i = 0; i < n; ++i) p_set += pp[i];
      C += w_sum - g * p_set;
      for (int64_t i = 0; i < n; ++i) sparse.emplace_back(S[i], ww[i] - static_cast<float>(g) * pp[i]);
    } else {
      C += w_sum;
      for (int64_t i = 0; i < n; ++i) sparse.emplace_back(S[i], ww[i]);
    }
  }
}

// out[0:V] = g[0:V] rounded to scalar_t (bfloat16 / float16).
template <typename scalar_t>
inline void store_converted(const float* g, int64_t V, scalar_t* out) {
  using RVec = at::vec::Vectorized<scalar_t>;
  int64_t j = 0;
  for (; j + RVec::size() <= V; j += RVec::size())
    at::vec::convert_from_float<scalar_t>(Vec::loadu(g + j), Vec::loadu(g + j + Vec::size())).store(out + j);
  for (; j < V; ++j) out[j] = static_cast<scalar_t>(g[j]);
}

// out[0:V] = the float32 gradient row given vector by vector by grad_at(j) (j < np, a multiple of the vector width),
// rounded once to scalar_t (bfloat16 / float16); full blocks go to memory with non-temporal stores when the row is
// aligned.
template <typename scalar_t, typename GradAt>
inline void store_reduced(const GradAt& grad_at, scalar_t* out, int64_t V, int64_t np) {
  using RVec = at::vec::Vectorized<scalar_t>;
  static_assert(RVec::size() == 2 * Vec::size(), "two float vectors per reduced vector");
  const bool stream = reinterpret_cast<uintptr_t>(out) % sizeof(RVec) == 0;
  alignas(64) float tmp[RVec::size()];
  int64_t j = 0;
  for (; j + RVec::size() <= V; j += RVec::size()) {
    const RVec v = at::vec::convert_from_float<scalar_t>(grad_at(j), grad_at(j + Vec::size()));
#if defined(CPU_CAPABILITY_AVX512)
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j), v);
      continue;
    }
#endif
    v.store(out + j);
  }
  if (j < V) {  // the last, partial block
    grad_at(j).store(tmp);
    if (j + Vec::size() < np) grad_at(j + Vec::size()).store(tmp + Vec::size());
    for (int64_t i = j; i < V; ++i) out[i] = static_cast<scalar_t>(tmp[i - j]);
  }
  if (stream) store_fence();
}

template <typename scalar_t>
void sweep_rows(const scalar_t* z, const scalar_t* u, const int64_t* labels, const int64_t* rows, int64_t n_rows,
                int64_t V, const Options& o, const float* div_coef, const float* nll_coef, scalar_t* grad,
                float* grad_f, float* values, float* nll, float* lse_s_out, float* lse_t_out) {
  const int64_t np = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const bool has_t = u != nullptr, need_grad = grad != nullptr || grad_f != nullptr;
  const bool dense = has_t && o.top_k == 0;  // every term over all of V
  const DenseFn<scalar_t> dense_fn = dense ? pick_dense<scalar_t>(o) : nullptr;
  bool need_l = false, need_t = false;
  for (const Term& term : o.terms) {
    need_l = need_l || term.support == LEARNER || term.support == UNION;
    need_t = need_t || term.support == TEACHER || term.support == UNION;
  }
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    // es: e_s; eq: e_t, then W (full vocabulary), or the sparse w scattered into a zeroed row (top-k); g: the float32
    // gradient row when the output is not float32 (written where T != 1 with labels, then converted)
    std::vector<float> es(np), eq(has_t ? np : 0);
    std::vector<float> et(has_t && o.tail ? np : 0), saved;  // tail: e_t, and rest_sums' saved entries
    std::vector<float> g(grad_f ? 0 : np);
    TopkSelector selector;  // top-k selections, fed by pass 2
    std::vector<int64_t> idx_l, idx_t, S;
    std::vector<uint8_t> mark(o.top_k > 0 ? V : 0, 0);
    std::vector<float> pk;
    std::vector<std::pair<int64_t, float>> sparse;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows ? rows[i] : i;
      const scalar_t* zr = z + r * V;
      const scalar_t* ur = has_t ? u + r * V : nullptr;
      alignas(64) float lanes_z[kMaxGroups * Vec::size()], lanes_u[kMaxGroups * Vec::size()];
      const int64_t groups = o.top_k > 0 ? std::max<int64_t>(topk_groups(o.top_k), 1) : 1;
      const float ms = row_max(zr, V, o.inv_T, need_l ? lanes_z : nullptr, groups);
      const bool select_l = !dense && has_t && need_l, select_t = !dense && has_t && need_t;
      if (select_l) selector.start(o.top_k, lanes_z);
      const double Zs = exp_sum(zr, V, np, o.inv_T, ms, es.data(), select_l ? &selector : nullptr);
      if (select_l) selector.finish(V, idx_l, mark);
      const float lse_s = (std::isfinite(ms) ? ms : 0.0f) + static_cast<float>(std::log(Zs));
      lse_s_out[r] = lse_s;
      const float inv_Zs = static_cast<float>(1.0 / Zs);
      const float kd = (has_t && need_grad) ? div_coef[r] * o.inv_T : 0.0f;
      double C = 0.0;
      if (!dense)
        for (const auto& e : sparse) eq[e.first] = 0.0f;  // the previous row's sparse w: the scratch is zero again
      sparse.clear();
      if (has_t) {
        const float mt = row_max(ur, V, o.inv_T, need_t ? lanes_u : nullptr, groups);
        if (select_t) selector.start(o.top_k, lanes_u);
        float* e_t = dense ? eq.data() : (o.tail ? et.data() : nullptr);  // top-k: only Z_t, unless a tail
        const double Zt = exp_sum(ur, V, np, o.inv_T, mt, e_t, select_t ? &selector : nullptr);
        if (select_t) selector.finish(V, idx_t, mark);
        const float lse_t = (std::isfinite(mt) ? mt : 0.0f) + static_cast<float>(std::log(Zt));
        lse_t_out[r] = lse_t;
        double F = 0.0;
        if (dense) {
          dense_fn(o, zr, ur, V, np, es.data(), eq.data(), inv_Zs, static_cast<float>(1.0 / Zt), lse_s, lse_t, F, C);
        } else {
          const RestRows rest{es.data(), et.data(), np, Zs, Zt, &saved};
          topk_terms(o, zr, ur, lse_s, lse_t, idx_l, idx_t, mark, S, pk, rest, F, C, sparse);
          if (need_grad)  // pass 4 adds kd * eq, as for the full vocabulary
            for (const auto& e : sparse) eq[e.first] += e.second;
        }
        values[r] = static_cast<float>(F);
      }
      // NLL of the label under p1 = softmax(z) (= p when T = 1); label smoothing eps spreads eps / V over V.
      float lse_z = lse_s;
      const bool p1_is_p = o.T == 1.0f;
      if (labels) {
        const int64_t y = labels[r];
        TORCH_CHECK(y >= 0 && y < V, "label ", y, " at row ", r, " is outside the vocabulary [0, ", V, ")");
        if (!p1_is_p) {  // log-normaliser of z itself: one more exp pass
          float mz = kNegInf;
          for (int64_t j = 0; j < V; ++j) mz = std::max(mz, static_cast<float>(zr[j]));
          const float m0 = std::isfinite(mz) ? mz : 0.0f;
          double Zz = 0.0;
          for (int64_t j = 0; j < V; ++j) Zz += std::exp(static_cast<float>(zr[j]) - m0);
          lse_z = m0 + static_cast<float>(std::log(Zz));
        }
        float value = lse_z - static_cast<float>(zr[y]);
        if (o.eps > 0.0f) {
          double sum_z = 0.0;
          for (int64_t j = 0; j < V; ++j) sum_z += static_cast<float>(zr[j]);
          value = (1.0f - o.eps) * value + o.eps * (lse_z - static_cast<float>(sum_z / V));
        }
        nll[r] = value;
      }
      if (!need_grad) continue;
      const float nc = labels ? nll_coef[r] : 0.0f;
      // pass 4: grad = kd (W - p C) + nc p1 - nc eps / V - (1 - eps) nc [y]  (top-k: W = the sparse w at S)
      float* out = grad_f ? grad_f + r * V : g.data();
      const Vec v_kd(kd), v_kdC(kd * static_cast<float>(C)), v_nc(nc), v_inv_Zs(inv_Zs);
      const Vec v_shift(-nc * o.eps / static_cast<float>(V));
      if (p1_is_p || !labels) {
        const float* es_p = es.data();
        const float* eq_p = eq.data();
        const bool with_w = has_t;
        const int64_t y = labels ? labels[r] : -1;
        const auto grad_at = [&](int64_t j) {  // the gradient at entries j .. j + width - 1 (j < np), label included
          const Vec p = Vec::loadu(es_p + j) * v_inv_Zs;
          Vec gv = v_nc * p + v_shift - v_kdC * p;
          if (with_w) gv = gv + v_kd * Vec::loadu(eq_p + j);
          if (static_cast<uint64_t>(y - j) < static_cast<uint64_t>(Vec::size())) {  // the label's vector
            alignas(64) float tmp[Vec::size()];
            gv.store(tmp);
            tmp[y - j] -= (1.0f - o.eps) * nc;
            gv = Vec::loadu(tmp);
          }
          return gv;
        };
        if constexpr (!std::is_same_v<scalar_t, float>) {
          if (!grad_f) {  // bf16/fp16 output rounded once, straight from registers
            store_reduced(grad_at, grad + r * V, V, np);
            continue;
          }
        }
        const bool stream = grad_f != nullptr && reinterpret_cast<uintptr_t>(out) % sizeof(Vec) == 0;
        const int64_t n_full = V / Vec::size() * Vec::size();
        for (int64_t j = 0; j < np; j += Vec::size()) {
          const Vec gv = grad_at(j);
          if (stream && j < n_full) {
            stream_store(gv, out + j);
          } else {
            store_row(gv, out, j, V);
          }
        }
        if (stream) store_fence();
      } else {
        const float kdC = kd * static_cast<float>(C);
        for (int64_t j = 0; j < V; ++j) {
          const float p1 = std::exp(static_cast<float>(zr[j]) - lse_z);
          const float p = es[j] * inv_Zs;
          out[j] = nc * p1 - nc * o.eps / static_cast<float>(V) - kdC * p + (has_t ? kd * eq[j] : 0.0f);
        }
        out[labels[r]] -= (1.0f - o.eps) * nc;
        if constexpr (!std::is_same_v<scalar_t, float>) {
          if (!grad_f) store_converted(out, V, grad + r * V);
        }
      }
    }
  });
}

// Entry point. z, u: [N, V] contiguous (float32, bfloat16 or float16); labels [N] int64; rows [n] int64 (the rows to
// process; None = all); kinds/weights/supports: the terms (supports -1 = all of V, else 0/1/2 = learner/teacher/
// union top-k with top_k > 0); div_coef, nll_coef [N] float32; grad [N, V] in z's dtype or
// float32 (written at the processed rows).
// Returns values, nll, lse_s, lse_t, each [N] float32 (written at the processed rows, 0 elsewhere).
std::vector<torch::Tensor> sweep(const torch::Tensor& z, const c10::optional<torch::Tensor>& u,
                                 const c10::optional<torch::Tensor>& labels, const c10::optional<torch::Tensor>& rows,
                                 const std::vector<int64_t>& kinds, const std::vector<double>& weights,
                                 const std::vector<int64_t>& supports, int64_t top_k, bool renormalize, bool tail,
                                 double T, double beta, double alpha, double eps,
                                 const c10::optional<torch::Tensor>& div_coef,
                                 const c10::optional<torch::Tensor>& nll_coef, const c10::optional<torch::Tensor>& grad) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && z.device().is_cpu(), "z must be a contiguous [N, V] CPU tensor");
  TORCH_CHECK(kinds.size() == weights.size() && kinds.size() == supports.size(), "kinds/weights/supports lengths");
  const int64_t N = z.size(0), V = z.size(1);
  TORCH_CHECK(top_k >= 0 && top_k <= V, "top_k must be in [0, V]: got ", top_k);
  TORCH_CHECK(top_k == 0 || V < (int64_t{1} << 31), "top-k selection needs V < 2^31, got ", V);
  TORCH_CHECK(!tail || (top_k > 0 && !renormalize), "a tail needs a top-k support and no renormalisation");
  if (u) TORCH_CHECK(u->sizes() == z.sizes() && u->is_contiguous() && u->scalar_type() == z.scalar_type(),
                     "u must be a contiguous tensor of z's shape and dtype");
  if (labels) TORCH_CHECK(labels->numel() == N && labels->scalar_type() == torch::kLong, "labels: [N] int64");
  if (rows) TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == torch::kLong && rows->is_contiguous(), "rows");
  if (grad) {
    TORCH_CHECK(grad->sizes() == z.sizes() && grad->is_contiguous() &&
                    (grad->scalar_type() == z.scalar_type() || grad->scalar_type() == torch::kFloat),
                "grad must be a contiguous tensor of z's shape, in z's dtype or float32");
    if (u) TORCH_CHECK(div_coef && div_coef->numel() == N && div_coef->scalar_type() == torch::kFloat, "div_coef");
    if (labels) TORCH_CHECK(nll_coef && nll_coef->numel() == N && nll_coef->scalar_type() == torch::kFloat, "nll_coef");
  }
  Options o;
  for (size_t i = 0; i < kinds.size(); ++i) {
    TORCH_CHECK(kinds[i] >= FORWARD_KL && kinds[i] <= TVD, "unknown kind code ", kinds[i]);
    TORCH_CHECK(supports[i] >= FULL && supports[i] <= UNION && ((supports[i] == FULL) == (top_k == 0)),
                "support code ", supports[i], " does not fit top_k ", top_k);
    o.terms.push_back({kinds[i], static_cast<float>(weights[i]), supports[i]});
  }
  o.T = static_cast<float>(T);
  o.inv_T = static_cast<float>(1.0 / T);
  o.beta = static_cast<float>(beta);
  o.alpha = static_cast<float>(alpha);
  o.eps = static_cast<float>(eps);
  o.top_k = top_k;
  o.renormalize = renormalize;
  o.tail = tail;
  auto fopts = z.options().dtype(torch::kFloat);
  torch::Tensor values = torch::zeros({N}, fopts), nll = torch::zeros({N}, fopts);
  torch::Tensor lse_s = torch::zeros({N}, fopts), lse_t = torch::zeros({N}, fopts);
  const int64_t n_rows = rows ? rows->numel() : N;
  const int64_t* rows_ptr = rows ? rows->data_ptr<int64_t>() : nullptr;
  const int64_t* labels_ptr = labels ? labels->data_ptr<int64_t>() : nullptr;
  const float* dc = (grad && u) ? div_coef->data_ptr<float>() : nullptr;
  const float* nc = (grad && labels) ? nll_coef->data_ptr<float>() : nullptr;
  const bool grad_in_float = grad && grad->scalar_type() == torch::kFloat;
  const bool grad_in_z_dtype = grad && !grad_in_float;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "ktransfer_sweep", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "float64 runs on the Python path");
    } else {
      sweep_rows<scalar_t>(z.data_ptr<scalar_t>(), u ? u->data_ptr<scalar_t>() : nullptr, labels_ptr, rows_ptr,
                           n_rows, V, o, dc, nc, grad_in_z_dtype ? grad->data_ptr<scalar_t>() : nullptr,
                           grad_in_float ? grad->data_ptr<float>() : nullptr,
                           values.data_ptr<float>(), nll.data_ptr<float>(), lse_s.data_ptr<float>(),
                           lse_t.data_ptr<float>());
    }
  });
  return {values, nll, lse_s, lse_t};
}

// fn elementwise over a contiguous float32 CPU tensor (the kernel's log and exp, exposed for the tests of their
// accuracy); lanes past the end are filled with `pad` and dropped.
template <typename Fn>
torch::Tensor elementwise(const torch::Tensor& x, const Fn& fn, float pad, const char* name) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() && x.scalar_type() == torch::kFloat, name,
              " takes a contiguous float32 CPU tensor");
  torch::Tensor y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t w = std::min<int64_t>(Vec::size(), n - j);
    fn(Vec::set(Vec(pad), Vec::loadu(xp + j, w), w)).store(yp + j, w);
  }
  return y;
}

torch::Tensor log_prob_tensor(const torch::Tensor& x) { return elementwise(x, log_prob, 1.0f, "log_prob"); }
torch::Tensor exp_tensor(const torch::Tensor& x) { return elementwise(x, fast_exp, 0.0f, "exp"); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("log_prob", &log_prob_tensor, "the kernel's log for x in [FLT_MIN, 3/2), elementwise (for its tests)");
  m.def("exp", &exp_tensor, "the kernel's exp, elementwise (for its tests)");
  m.def("sweep", &sweep, "value, NLL and gradient of a full-vocabulary divergence over rows (see the file header)");
}
