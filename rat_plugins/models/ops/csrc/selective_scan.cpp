// CPU selective-scan recurrence for rat_plugins.models.ops.selective_scan.
//
// Forward (scan_fwd_fused): exp(delta * A) is computed inside the recurrence, 16 lanes of the state
// at a time with GCC vector extensions (no [batch, dim, L, state] block is ever written to
// memory); optionally softplus(delta + bias) is applied to the row first and (y + D u) * silu(z)
// after. Backward (scan_bwd_chunk): the exponentials of one chunk of time steps come from ATen
// (vectorised over [batch, dim, chunk, state]) and the sequential part runs here. Both are
// parallel over batch x dim with at::parallel_for:
//
//   forward   s_t = exp(delta_t A) * s_{t-1} + delta_t * u_t * B_t ;  y_t = sum_n C_t[n] s_t[n]
//   backward  the reverse-time adjoint h_t = dL/ds_t = gy_t C_t + dA_{t+1} * h_{t+1}, with the
//             states of the chunk recomputed from the state saved at the chunk start.
//
// Layouts (all contiguous, same floating dtype):
//   dA        [batch, dim, T, state]      exp(delta * A) for time steps t0 .. t0+T-1 (backward)
//   delta, u  [batch, dim, L]             delta biased / softplus-ed unless the forward does it
//   Bm, Cm    [batch, groups, L, state]   (time-major per group: the state axis is contiguous)
//   state     [batch, dim, state]         carried across chunks, updated in place
// Functions marked RAT_CLONES are compiled for the x86-64-v4 / v3 ISA levels and the baseline
// (target_clones, picked at load time by CPU features: arch=haswell clones are matched by CPU
// model and were never picked on newer CPUs).
// Only the headers needed (not <torch/extension.h>): the first-use compile takes seconds, not a minute.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Largest state size of the generic (not unrolled) path; mamba-ssm's kernel allows 256.
constexpr int64_t kMaxState = 256;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RAT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RAT_CLONES
#endif

// Shapes, contiguity, device and dtype of one chunk's inputs; T and N come from dA (chunked
// kernels) or from the call and A (fused forward); `ref` is the tensor whose dtype all must share.
void check_chunk(const at::Tensor& ref, int64_t T, int64_t N, const at::Tensor& delta, const at::Tensor& u,
                 const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& state, int64_t t0) {
  TORCH_CHECK(delta.dim() == 3 && u.dim() == 3 && Bm.dim() == 4 && Cm.dim() == 4 && state.dim() == 3,
              "selective_scan cpp: bad tensor ranks");
  for (const at::Tensor* t : {&ref, &delta, &u, &Bm, &Cm, &state}) {
    TORCH_CHECK(t->is_contiguous(), "selective_scan cpp: tensors must be contiguous");
    TORCH_CHECK(t->device().is_cpu(), "selective_scan cpp: tensors must be on the CPU");
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), "selective_scan cpp: dtypes differ");
  }
  const int64_t batch = delta.size(0), dim = delta.size(1), L = delta.size(2), G = Bm.size(1);
  TORCH_CHECK(u.sizes() == delta.sizes(), "selective_scan cpp: delta / u shape");
  TORCH_CHECK(Bm.size(0) == batch && Bm.size(2) == L && Bm.size(3) == N && Cm.sizes() == Bm.sizes(),
              "selective_scan cpp: B / C shape");
  TORCH_CHECK(G > 0 && dim % G == 0, "selective_scan cpp: groups must divide dim");
  TORCH_CHECK(state.size(0) == batch && state.size(1) == dim && state.size(2) == N,
              "selective_scan cpp: state shape");
  TORCH_CHECK(t0 >= 0 && T >= 0 && t0 + T <= L, "selective_scan cpp: chunk out of range");
  TORCH_CHECK(N >= 1 && N <= kMaxState, "selective_scan cpp: state size must be in [1, 256]");
}

void check_inputs(const at::Tensor& dA, const at::Tensor& delta, const at::Tensor& u,
                  const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& state,
                  int64_t t0) {
  TORCH_CHECK(dA.dim() == 4 && delta.dim() == 3 && dA.size(0) == delta.size(0) && dA.size(1) == delta.size(1),
              "selective_scan cpp: dA must be [batch, dim, T, state]");
  check_chunk(dA, dA.size(2), dA.size(3), delta, u, Bm, Cm, state, t0);
}

int64_t grain_for(int64_t work_per_item) {
  // at least ~16k multiply-adds per task so that tiny problems do not pay for thread start-up
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_item));
}

// exp of 16 floats with GCC vector extensions (one AVX-512 register in the x86-64-v4 clone, two
// AVX2 ones in the x86-64-v3 clone, four SSE ones in the baseline): Cephes' expf - x = n ln2 + r
// with ln2 split in two, n rounded to nearest by the 1.5 * 2^23 trick, degree-7 polynomial for
// e^r, 2^n from the exponent bits; relative error below 2e-7. Arguments are clamped to
// [-87.3, 88.3], the normal float range (exp(-87.3) = 1e-38 stands in for smaller values: a decay
// that makes no difference next to 1).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline __attribute__((always_inline)) v16f exp16(v16f x) {
  const v16f lo = v16f{} - 87.3f, hi = v16f{} + 88.3f, magic = v16f{} + 12582912.0f;
  x = x > lo ? x : lo;
  x = x < hi ? x : hi;
  const v16f n = (x * 1.44269504088896341f + magic) - magic;
  const v16f r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16f p = v16f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  return p * reinterpret_cast<const v16f&>(bits);
}

inline __attribute__((always_inline)) v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

inline __attribute__((always_inline)) v16f silu16(v16f x) { return x / (1.0f + exp16(-x)); }

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

inline __attribute__((always_inline)) float sum16(v16f c) {  // a tree: halves added, not 16 serial adds
  const v8f h8 = __builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f h4 = __builtin_shufflevector(h8, h8, 0, 1, 2, 3) + __builtin_shufflevector(h8, h8, 4, 5, 6, 7);
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// softplus(x) = log(1 + e^x) as torch computes it (x itself above 20), 16 lanes. log1p(w) is
// log(u) * w / (u - 1) with u = 1 + w (exact to a few ulp where log(1 + w) alone loses the low
// bits of w; w itself where u rounds to 1); log(u) is Cephes' logf (mantissa in
// [sqrt(1/2), sqrt(2)), degree-9 polynomial, exponent times ln2 split in two).
inline __attribute__((always_inline)) v16f log16(v16f u) {  // u > 0, finite
  const v16i bits = reinterpret_cast<const v16i&>(u);
  v16i e = ((bits >> 23) & 0xff) - 126;                      // u = m 2^e, m in [0.5, 1)
  const v16i mbits = (bits & 0x007fffff) | 0x3f000000;
  v16f m = reinterpret_cast<const v16f&>(mbits);
  const v16i small = m < 0.70710678118654752f;              // -1 where m < sqrt(1/2)
  e += small;                                                // e - 1 there
  m = (small != 0) ? m + m : m;
  const v16f x = m - 1.0f, z = x * x;
  v16f y = v16f{} + 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  const v16f ef = __builtin_convertvector(e, v16f);
  y = y * x * z + ef * -2.12194440e-4f - 0.5f * z;
  return x + y + ef * 0.693359375f;
}

inline __attribute__((always_inline)) v16f softplus16(v16f x) {
  const v16f w = exp16(x < 20.0f ? x : v16f{} + 20.0f);
  const v16f u = 1.0f + w, um1 = u - 1.0f;
  const v16f lp = um1 == 0.0f ? w : log16(u) * (w / (um1 == 0.0f ? v16f{} + 1.0f : um1));
  return x > 20.0f ? x : lp;
}

// Per-(batch, dim) row of the fused forward over T steps, s_t = exp(delta_t A) s_{t-1} + delta_t u_t B_t,
// for float state sizes that are multiples of 16 (ViM: 16): the state lives in registers.
template <int NV>
inline __attribute__((always_inline)) void fused_row_vec(
    const float* __restrict__ Ad, const float* __restrict__ del, const float* __restrict__ uu,
    const float* __restrict__ Bg, const float* __restrict__ Cg, float* __restrict__ yy,
    float* __restrict__ st, int64_t T) {
  constexpr int N = 16 * NV;
  v16f s[NV], a[NV];
  for (int k = 0; k < NV; ++k) {
    s[k] = load16(st + 16 * k);
    a[k] = load16(Ad + 16 * k);
  }
  for (int64_t t = 0; t < T; ++t) {
    const float dt = del[t], du = dt * uu[t];
    const float* bt = Bg + t * N;
    const float* ct = Cg + t * N;
    v16f c = v16f{};
    for (int k = 0; k < NV; ++k) {
      s[k] = exp16(a[k] * dt) * s[k] + load16(bt + 16 * k) * du;
      c += load16(ct + 16 * k) * s[k];
    }
    yy[t] = sum16(c);
  }
  for (int k = 0; k < NV; ++k) store16(st + 16 * k, s[k]);
}

// Any state size and dtype: the exponentials one at a time.
template <typename scalar_t>
inline __attribute__((always_inline)) void fused_row_any(
    const scalar_t* Ad, const scalar_t* del, const scalar_t* uu, const scalar_t* Bg, const scalar_t* Cg,
    scalar_t* yy, scalar_t* st, int64_t T, int64_t N) {
  scalar_t s[kMaxState];
  for (int64_t n = 0; n < N; ++n) s[n] = st[n];
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t dt = del[t], du = dt * uu[t];
    scalar_t acc = 0;
    for (int64_t n = 0; n < N; ++n) {
      s[n] = std::exp(dt * Ad[n]) * s[n] + du * Bg[t * N + n];
      acc += Cg[t * N + n] * s[n];
    }
    yy[t] = acc;
  }
  for (int64_t n = 0; n < N; ++n) st[n] = s[n];
}

RAT_CLONES void fused_rows(const float* Ad, const float* del, const float* uu, const float* Bg,
                                 const float* Cg, float* yy, float* st, int64_t T, int64_t N) {
  switch (N) {
    case 16: fused_row_vec<1>(Ad, del, uu, Bg, Cg, yy, st, T); break;
    case 32: fused_row_vec<2>(Ad, del, uu, Bg, Cg, yy, st, T); break;
    default: fused_row_any<float>(Ad, del, uu, Bg, Cg, yy, st, T, N);
  }
}
void fused_rows(const double* Ad, const double* del, const double* uu, const double* Bg, const double* Cg,
                double* yy, double* st, int64_t T, int64_t N) {
  fused_row_any<double>(Ad, del, uu, Bg, Cg, yy, st, T, N);
}

// Scalar prologue / epilogue (double rows, and the last T % 16 steps of float rows).
template <typename scalar_t>
inline void delta_steps(scalar_t* out, const scalar_t* del, scalar_t bias, bool softplus, int64_t t, int64_t T) {
  for (; t < T; ++t) {
    const scalar_t v = del[t] + bias;
    out[t] = softplus && v <= scalar_t(20) ? std::log1p(std::exp(v)) : v;
  }
}

template <typename scalar_t>
inline void gate_steps(scalar_t* yy, const scalar_t* uu, const scalar_t* zz, scalar_t Dd, bool has_d, int64_t t,
                       int64_t T) {
  for (; t < T; ++t) {
    scalar_t v = yy[t] + (has_d ? Dd * uu[t] : scalar_t(0));
    if (zz != nullptr) v = v * zz[t] / (scalar_t(1) + std::exp(-zz[t]));
    yy[t] = v;
  }
}

// Prologue of one row: out_t = softplus(delta_t + bias) (either part optional), 16 steps at a time.
RAT_CLONES void delta_row(float* out, const float* del, float bias, bool softplus, int64_t T) {
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) {
    v16f v = load16(del + t) + bias;
    if (softplus) v = softplus16(v);
    store16(out + t, v);
  }
  delta_steps(out, del, bias, softplus, t, T);
}

void delta_row(double* out, const double* del, double bias, bool softplus, int64_t T) {
  delta_steps(out, del, bias, softplus, 0, T);
}

// Epilogue of one row: y_t = (y_t + D u_t) * silu(z_t) (either part optional), 16 steps at a time.
RAT_CLONES void gate_row(float* yy, const float* uu, const float* zz, float Dd, bool has_d, int64_t T) {
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) {
    v16f yv = load16(yy + t);
    if (has_d) yv += load16(uu + t) * Dd;
    if (zz != nullptr) yv *= silu16(load16(zz + t));
    store16(yy + t, yv);
  }
  gate_steps(yy, uu, zz, Dd, has_d, t, T);
}

void gate_row(double* yy, const double* uu, const double* zz, double Dd, bool has_d, int64_t T) {
  gate_steps(yy, uu, zz, Dd, has_d, 0, T);
}

template <typename scalar_t>
void fused_impl(const at::Tensor& A_, const at::Tensor& delta_, const at::Tensor& u_, const at::Tensor& B_,
                const at::Tensor& C_, at::Tensor& state_, at::Tensor& y_, int64_t t0, int64_t T,
                const at::Tensor& D_, const at::Tensor& z_, const at::Tensor& bias_, bool softplus) {
  const int64_t batch = delta_.size(0), dim = delta_.size(1), L = delta_.size(2), N = A_.size(1);
  const int64_t G = B_.size(1), dpg = dim / G;
  const scalar_t* A = A_.data_ptr<scalar_t>();
  const scalar_t* delta = delta_.data_ptr<scalar_t>();
  const scalar_t* u = u_.data_ptr<scalar_t>();
  const scalar_t* Bp = B_.data_ptr<scalar_t>();
  const scalar_t* Cp = C_.data_ptr<scalar_t>();
  scalar_t* state = state_.data_ptr<scalar_t>();
  scalar_t* y = y_.data_ptr<scalar_t>();
  const bool has_d = D_.defined(), has_z = z_.defined();
  const scalar_t* Dp = has_d ? D_.data_ptr<scalar_t>() : nullptr;
  const scalar_t* zp = has_z ? z_.data_ptr<scalar_t>() : nullptr;
  const bool has_bias = bias_.defined(), prologue = has_bias || softplus;
  const scalar_t* biasp = has_bias ? bias_.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, batch * dim, grain_for(4 * T * N), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dt_row(prologue ? T : 0);
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t b = bd / dim, d = bd % dim, g = d / dpg;
      const scalar_t* dt = delta + bd * L + t0;
      if (prologue) {  // softplus(delta + bias) of this row only: it stays in cache for the scan
        delta_row(dt_row.data(), dt, has_bias ? biasp[d] : scalar_t(0), softplus, T);
        dt = dt_row.data();
      }
      fused_rows(A + d * N, dt, u + bd * L + t0, Bp + ((b * G + g) * L + t0) * N,
                 Cp + ((b * G + g) * L + t0) * N, y + bd * L + t0, state + bd * N, T, N);
      if (has_d || has_z)  // while the row is still in cache
        gate_row(y + bd * L + t0, u + bd * L + t0, has_z ? zp + bd * L + t0 : nullptr,
                 has_d ? Dp[d] : scalar_t(0), has_d, T);
    }
  });
}

// Per-(batch, dim) row of the backward pass over one chunk: recompute the states from s_init into S,
// then run the adjoint h backwards in time (H receives h_t = dL/ds_t).
template <typename scalar_t, int NS>
inline __attribute__((always_inline)) void bwd_row(
    const scalar_t* __restrict__ dA, const scalar_t* __restrict__ del, const scalar_t* __restrict__ uu,
    const scalar_t* __restrict__ Bg, const scalar_t* __restrict__ Cg, const scalar_t* __restrict__ Ad,
    const scalar_t* __restrict__ gyy, const scalar_t* __restrict__ s_init, scalar_t* __restrict__ hio,
    scalar_t* __restrict__ gAd, scalar_t* __restrict__ gdel, scalar_t* __restrict__ guu,
    scalar_t* __restrict__ S, scalar_t* __restrict__ H, int64_t T, int64_t N_) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const int64_t N = NS > 0 ? NS : N_;
  scalar_t s[NS > 0 ? NS : kMaxState];
  scalar_t h[NS > 0 ? NS : kMaxState];
  acc_t gA[NS > 0 ? NS : kMaxState];
  // 1. states of the chunk
  for (int64_t n = 0; n < N; ++n) s[n] = s_init[n];
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t du = del[t] * uu[t];
    const scalar_t* a = dA + t * N;
    const scalar_t* bt = Bg + t * N;
    scalar_t* out = S + t * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      s[n] = a[n] * s[n] + du * bt[n];
      out[n] = s[n];
    }
  }
  // 2. reverse-time adjoint
  for (int64_t n = 0; n < N; ++n) {
    h[n] = hio[n];
    gA[n] = 0;
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    const scalar_t* a = dA + t * N;
    const scalar_t* bt = Bg + t * N;
    const scalar_t* ct = Cg + t * N;
    const scalar_t* sprev = t > 0 ? S + (t - 1) * N : s_init;
    scalar_t* Ht = H + t * N;
    const scalar_t gyt = gyy[t];
    const scalar_t dt = del[t];
    scalar_t sum_hB = 0, sum_gaA = 0;
#pragma omp simd reduction(+ : sum_hB, sum_gaA)
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t hn = h[n] + gyt * ct[n];
      Ht[n] = hn;
      const scalar_t gx = hn * sprev[n] * a[n];  // dL / d(delta_t A_n), through exp
      sum_gaA += gx * Ad[n];
      gA[n] += acc_t(gx) * acc_t(dt);
      sum_hB += hn * bt[n];
      h[n] = a[n] * hn;
    }
    gdel[t] = sum_gaA + uu[t] * sum_hB;
    guu[t] = dt * sum_hB;
  }
  for (int64_t n = 0; n < N; ++n) {
    hio[n] = h[n];
    gAd[n] = static_cast<scalar_t>(acc_t(gAd[n]) + gA[n]);
  }
}

#define RAT_BWD_ARGS(T_)                                                                        \
  const T_ *dA, const T_ *del, const T_ *uu, const T_ *Bg, const T_ *Cg, const T_ *Ad,          \
      const T_ *gyy, const T_ *s_init, T_ *hio, T_ *gAd, T_ *gdel, T_ *guu, T_ *S, T_ *H,       \
      int64_t T, int64_t N
#define RAT_BWD_DISPATCH(T_)                                                                    \
  switch (N) {                                                                                  \
    case 16: bwd_row<T_, 16>(dA, del, uu, Bg, Cg, Ad, gyy, s_init, hio, gAd, gdel, guu, S, H, T, N); break; \
    case 8: bwd_row<T_, 8>(dA, del, uu, Bg, Cg, Ad, gyy, s_init, hio, gAd, gdel, guu, S, H, T, N); break;   \
    default: bwd_row<T_, 0>(dA, del, uu, Bg, Cg, Ad, gyy, s_init, hio, gAd, gdel, guu, S, H, T, N);         \
  }

RAT_CLONES void bwd_rows(RAT_BWD_ARGS(float)) { RAT_BWD_DISPATCH(float) }
RAT_CLONES void bwd_rows(RAT_BWD_ARGS(double)) { RAT_BWD_DISPATCH(double) }

template <typename scalar_t>
void bwd_impl(const at::Tensor& dA_, const at::Tensor& delta_, const at::Tensor& u_,
              const at::Tensor& B_, const at::Tensor& C_, const at::Tensor& A_,
              const at::Tensor& gy_, const at::Tensor& s0_, at::Tensor& h_, at::Tensor& gA_,
              at::Tensor& gdelta_, at::Tensor& gu_, at::Tensor& S_, at::Tensor& H_, int64_t t0) {
  const int64_t batch = dA_.size(0), dim = dA_.size(1), T = dA_.size(2), N = dA_.size(3);
  const int64_t L = delta_.size(2), G = B_.size(1), dpg = dim / G;
  const scalar_t* dA = dA_.data_ptr<scalar_t>();
  const scalar_t* delta = delta_.data_ptr<scalar_t>();
  const scalar_t* u = u_.data_ptr<scalar_t>();
  const scalar_t* Bp = B_.data_ptr<scalar_t>();
  const scalar_t* Cp = C_.data_ptr<scalar_t>();
  const scalar_t* Ap = A_.data_ptr<scalar_t>();
  const scalar_t* gy = gy_.data_ptr<scalar_t>();
  const scalar_t* s0 = s0_.data_ptr<scalar_t>();
  scalar_t* hp = h_.data_ptr<scalar_t>();
  scalar_t* gA = gA_.data_ptr<scalar_t>();
  scalar_t* gdelta = gdelta_.data_ptr<scalar_t>();
  scalar_t* gu = gu_.data_ptr<scalar_t>();
  scalar_t* S = S_.data_ptr<scalar_t>();
  scalar_t* H = H_.data_ptr<scalar_t>();

  at::parallel_for(0, batch * dim, grain_for(4 * T * N), [&](int64_t begin, int64_t end) {
    for (int64_t bd = begin; bd < end; ++bd) {
      const int64_t b = bd / dim, d = bd % dim, g = d / dpg;
      const int64_t bgo = ((b * G + g) * L + t0) * N;
      bwd_rows(dA + bd * T * N, delta + bd * L + t0, u + bd * L + t0, Bp + bgo, Cp + bgo, Ap + d * N,
               gy + bd * L + t0, s0 + bd * N, hp + bd * N, gA + bd * N, gdelta + bd * L + t0,
               gu + bd * L + t0, S + bd * T * N, H + bd * T * N, T, N);
    }
  });
}

template <typename scalar_t>
void reduce_impl(const at::Tensor& X_, const at::Tensor& w_, at::Tensor& out_, int64_t t0) {
  // out[b, g, t0 + t, n] = sum_{d in group g} w[b, d, t0 + t] * X[b, d, t, n]
  const int64_t batch = X_.size(0), dim = X_.size(1), T = X_.size(2), N = X_.size(3);
  const int64_t L = w_.size(2), G = out_.size(1), dpg = dim / G;
  const scalar_t* X = X_.data_ptr<scalar_t>();
  const scalar_t* w = w_.data_ptr<scalar_t>();
  scalar_t* out = out_.data_ptr<scalar_t>();
  at::parallel_for(0, batch * G * T, grain_for(dpg * N), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc(N);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % T, bg = i / T, b = bg / G, g = bg % G;
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t dd = 0; dd < dpg; ++dd) {
        const int64_t bd = b * dim + g * dpg + dd;
        const scalar_t wv = w[bd * L + t0 + t];
        const scalar_t* x = X + (bd * T + t) * N;
        for (int64_t n = 0; n < N; ++n) acc[n] += wv * x[n];
      }
      std::copy(acc.begin(), acc.end(), out + (bg * L + t0 + t) * N);
    }
  });
}

}  // namespace

// y[:, :, t0:t0+T] = scan of the chunk with the exponentials computed in place; state updated in place.
// delta_bias ([dim]) and delta_softplus, when given, turn delta into softplus(delta + bias) row by row
// first; D ([dim]) and z ([batch, dim, L]) are applied to the chunk's y after: y = (y + D u) * silu(z).
void scan_fwd_fused(at::Tensor A, at::Tensor delta, at::Tensor u, at::Tensor Bm, at::Tensor Cm,
                    at::Tensor state, at::Tensor y, int64_t t0, int64_t T, c10::optional<at::Tensor> D,
                    c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias, bool delta_softplus) {
  TORCH_CHECK(A.dim() == 2 && delta.dim() == 3 && A.size(0) == delta.size(1),
              "selective_scan cpp: A must be [dim, state]");
  check_chunk(A, T, A.size(1), delta, u, Bm, Cm, state, t0);
  TORCH_CHECK(y.is_contiguous() && y.sizes() == delta.sizes() && y.scalar_type() == delta.scalar_type(),
              "selective_scan cpp: y");
  const at::Tensor Dt = D.has_value() ? *D : at::Tensor(), zt = z.has_value() ? *z : at::Tensor();
  const at::Tensor bt = delta_bias.has_value() ? *delta_bias : at::Tensor();
  if (bt.defined())
    TORCH_CHECK(bt.is_contiguous() && bt.dim() == 1 && bt.size(0) == delta.size(1) &&
                    bt.scalar_type() == delta.scalar_type(), "selective_scan cpp: delta_bias must be [dim]");
  if (Dt.defined())
    TORCH_CHECK(Dt.is_contiguous() && Dt.dim() == 1 && Dt.size(0) == delta.size(1) &&
                    Dt.scalar_type() == delta.scalar_type(), "selective_scan cpp: D must be [dim]");
  if (zt.defined())
    TORCH_CHECK(zt.is_contiguous() && zt.sizes() == delta.sizes() && zt.scalar_type() == delta.scalar_type(),
                "selective_scan cpp: z must be [batch, dim, L]");
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "selective_scan_fwd_fused", [&] {
    fused_impl<scalar_t>(A, delta, u, Bm, Cm, state, y, t0, T, Dt, zt, bt, delta_softplus);
  });
}

// Backward of one chunk. h (in/out): adjoint carried in from the later chunks; gA (in/out):
// per-(batch, dim) partial sums; gdelta / gu written for the chunk; S / H ([batch, dim, T, state])
// receive the states and adjoints of the chunk (reduced over dim into dC / dB by reduce_over_dim).
void scan_bwd_chunk(at::Tensor dA, at::Tensor delta, at::Tensor u, at::Tensor Bm, at::Tensor Cm,
                    at::Tensor A, at::Tensor gy, at::Tensor s0, at::Tensor h, at::Tensor gA,
                    at::Tensor gdelta, at::Tensor gu, at::Tensor S, at::Tensor H, int64_t t0) {
  check_inputs(dA, delta, u, Bm, Cm, s0, t0);
  for (const at::Tensor* t : {&A, &gy, &h, &gA, &gdelta, &gu, &S, &H}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == dA.scalar_type(),
                "selective_scan cpp: backward buffers must be contiguous and of one dtype");
  }
  TORCH_CHECK(A.size(0) == dA.size(1) && A.size(1) == dA.size(3), "selective_scan cpp: A shape");
  TORCH_CHECK(gy.sizes() == delta.sizes() && gdelta.sizes() == delta.sizes() &&
                  gu.sizes() == delta.sizes(), "selective_scan cpp: gradient shapes");
  TORCH_CHECK(h.sizes() == s0.sizes() && gA.sizes() == s0.sizes(), "selective_scan cpp: h / gA");
  TORCH_CHECK(S.sizes() == dA.sizes() && H.sizes() == dA.sizes(), "selective_scan cpp: S / H");
  AT_DISPATCH_FLOATING_TYPES(dA.scalar_type(), "selective_scan_bwd_chunk", [&] {
    bwd_impl<scalar_t>(dA, delta, u, Bm, Cm, A, gy, s0, h, gA, gdelta, gu, S, H, t0);
  });
}

void reduce_over_dim(at::Tensor X, at::Tensor w, at::Tensor out, int64_t t0) {
  TORCH_CHECK(X.dim() == 4 && w.dim() == 3 && out.dim() == 4, "reduce_over_dim: ranks");
  TORCH_CHECK(X.is_contiguous() && w.is_contiguous() && out.is_contiguous(), "reduce_over_dim: contiguity");
  TORCH_CHECK(X.scalar_type() == w.scalar_type() && X.scalar_type() == out.scalar_type(), "reduce_over_dim: dtypes");
  TORCH_CHECK(out.size(0) == X.size(0) && X.size(1) % out.size(1) == 0 && out.size(3) == X.size(3) &&
                  w.size(0) == X.size(0) && w.size(1) == X.size(1) && out.size(2) == w.size(2) &&
                  t0 >= 0 && t0 + X.size(2) <= w.size(2),
              "reduce_over_dim: shapes");
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "selective_scan_reduce", [&] {
    reduce_impl<scalar_t>(X, w, out, t0);
  });
}

// ------------------------------------------------------------------------------------------------
// Bidirectional ("bimamba v2") mixer, inference only, in the token-major layout the linear layers
// produce: x, z = halves of xz [batch, L, 2 dim]. Direction 0 is the causal pass over t = 0 .. L-1;
// direction 1 is the causal pass over the reversed sequence, computed in the original time order
// (an anti-causal conv and a scan from t = L-1 down to 0), so no token flip or copy is ever made.
// Channels are contiguous here, so 16 channels fill one vector and the state sum needs no
// horizontal add. Both functions take float32 contiguous tensors; dim must be a multiple of 16.

// 2^x for x <= 0, 16 lanes, in about half the operations of exp16 (the scan's decays exp(delta A)
// with A < 0 and delta >= 0, A prescaled by log2(e)): x = n + f with n = round(x) by the
// 1.5 * 2^23 trick, whose integer sits in the low bits of x + 1.5 * 2^23 and gives 2^n's exponent
// bits directly; 2^f on [-1/2, 1/2] by a degree-5 relative-minimax polynomial (fitted here,
// relative error 1.8e-7 in float arithmetic). x is clamped to -126 (2^-126, the smallest normal
// float, stands in for smaller decays).
inline __attribute__((always_inline)) v16f exp2_nonpos16(v16f x) {
  const v16f lo = v16f{} - 126.0f, magic = v16f{} + 12582912.0f;
  x = x > lo ? x : lo;
  const v16f t = x + magic;
  const v16f f = x - (t - magic);
  v16f p = v16f{} + 1.3282304862514138e-3f;
  p = p * f + 9.675589390099049e-3f;
  p = p * f + 5.550695210695267e-2f;
  p = p * f + 2.4022118747234344e-1f;
  p = p * f + 6.931470036506653e-1f;
  p = p * f + 1.0000001192092896f;
  // bits of t are 0x4B400000 + n: subtracting 0x4B400000 - 127 leaves the biased exponent n + 127
  const v16i bits = (reinterpret_cast<const v16i&>(t) - (0x4B400000 - 127)) << 23;
  return p * reinterpret_cast<const v16f&>(bits);
}

// u[dir, b, t, c] = silu(bias[dir, c] + sum_k w[dir, k, c] x[b, src, c]) with src = t - (K-1) + k
// (direction 0) or t + (K-1) - k (direction 1); zero padding outside [0, L).
RAT_CLONES void conv_silu_rows(const float* xz, const float* w, const float* bias, float* u, int64_t batch,
                               int64_t L, int64_t dim, int64_t K, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t dir = i / (batch * L), bt = i % (batch * L), b = bt / L, t = bt % L;
    float* out = u + i * dim;
    const float* bi = bias + dir * dim;
    for (int64_t c = 0; c < dim; c += 16) {
      v16f acc = load16(bi + c);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t src = dir == 0 ? t - (K - 1) + k : t + (K - 1) - k;
        if (src < 0 || src >= L) continue;
        acc += load16(w + (dir * K + k) * dim + c) * load16(xz + (b * L + src) * 2 * dim + c);
      }
      store16(out + c, silu16(acc));
    }
  }
}

void bimamba_conv_silu(at::Tensor xz, at::Tensor w, at::Tensor bias, at::Tensor u) {
  TORCH_CHECK(xz.dim() == 3 && w.dim() == 3 && bias.dim() == 2 && u.dim() == 4, "bimamba_conv_silu: ranks");
  for (const at::Tensor* t : {&xz, &w, &bias, &u}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "bimamba_conv_silu: tensors must be contiguous float32 CPU tensors");
  }
  const int64_t batch = xz.size(0), L = xz.size(1), dim = xz.size(2) / 2, K = w.size(1);
  TORCH_CHECK(xz.size(2) == 2 * dim && dim % 16 == 0, "bimamba_conv_silu: xz must be [batch, L, 2 dim], dim % 16 == 0");
  TORCH_CHECK(w.size(0) == 2 && w.size(2) == dim && bias.size(0) == 2 && bias.size(1) == dim,
              "bimamba_conv_silu: w [2, K, dim], bias [2, dim]");
  TORCH_CHECK(u.size(0) == 2 && u.size(1) == batch && u.size(2) == L && u.size(3) == dim,
              "bimamba_conv_silu: u must be [2, batch, L, dim]");
  const float* xp = xz.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* up = u.data_ptr<float>();
  at::parallel_for(0, 2 * batch * L, grain_for(2 * K * dim), [&](int64_t begin, int64_t end) {
    conv_silu_rows(xp, wp, bp, up, batch, L, dim, K, begin, end);
  });
}

// One (batch, 16-channel block) of both directions. dbl rows hold [dt (R) | B (N) | C (N)]; delta
// = dt_w^T dt + bias is formed here, per step, rather than written to memory by a matmul (its R
// multiply-adds cost less than reading a [batch, L, dim] delta back).
template <int N>
inline __attribute__((always_inline)) void bimamba_block(
    const float* __restrict__ xz, const float* __restrict__ u, const float* __restrict__ dbl,
    const float* __restrict__ dt_w, const float* __restrict__ At, const float* __restrict__ D,
    const float* __restrict__ bias, float* __restrict__ out, int64_t batch, int64_t L, int64_t dim, int64_t R,
    int64_t b, int64_t c0, float scale) {
  const int64_t W = R + 2 * N;
  for (int dir = 0; dir < 2; ++dir) {
    v16f s[N], a[N];
    for (int n = 0; n < N; ++n) {
      s[n] = v16f{};
      a[n] = load16(At + (dir * N + n) * dim + c0) * 1.44269504088896341f;  // exp(dt A) = 2^(dt A log2 e)
    }
    const v16f dv = load16(D + dir * dim + c0), bv = load16(bias + dir * dim + c0);
    const float* wd = dt_w + dir * R * dim + c0;
    const int64_t base = dir * batch * L + b * L;  // row of (dir, b, t = 0) in u / dbl
    for (int64_t step = 0; step < L; ++step) {
      const int64_t t = dir == 0 ? step : L - 1 - step;
      const float* row = dbl + (base + t) * W;
      v16f dpre = bv;
      for (int64_t r = 0; r < R; ++r) dpre += load16(wd + r * dim) * row[r];
      const v16f dt = softplus16(dpre);
      const v16f uu = load16(u + (base + t) * dim + c0), du = dt * uu;
      const float* bt = row + R;
      const float* ct = bt + N;
      v16f y = v16f{};
      for (int n = 0; n < N; ++n) {
        s[n] = exp2_nonpos16(a[n] * dt) * s[n] + du * bt[n];
        y += s[n] * ct[n];
      }
      y = (y + dv * uu) * silu16(load16(xz + (b * L + t) * 2 * dim + dim + c0)) * scale;
      float* o = out + (b * L + t) * dim + c0;
      store16(o, dir == 0 ? y : load16(o) + y);
    }
  }
}

RAT_CLONES void bimamba_blocks(const float* xz, const float* u, const float* dbl, const float* dt_w,
                               const float* At, const float* D, const float* bias, float* out, int64_t batch,
                               int64_t L, int64_t dim, int64_t R, float scale, int64_t begin, int64_t end) {
  const int64_t blocks = dim / 16;
  for (int64_t i = begin; i < end; ++i)
    bimamba_block<16>(xz, u, dbl, dt_w, At, D, bias, out, batch, L, dim, R, i / blocks, (i % blocks) * 16, scale);
}

// out[b, t, :] = scale * (y_dir0 + y_dir1), y = (scan(u, softplus(dt_w^T dt + bias), A, B, C) + D u) * silu(z)
// with dt, B, C the rows of dbl [2, batch L, R + 2 N] and dt_w [2, R, dim].
void bimamba_scan(at::Tensor xz, at::Tensor u, at::Tensor dbl, at::Tensor dt_w, at::Tensor At, at::Tensor D,
                  at::Tensor bias, at::Tensor out, double scale) {
  for (const at::Tensor* t : {&xz, &u, &dbl, &dt_w, &At, &D, &bias, &out}) {
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu() && t->scalar_type() == at::kFloat,
                "bimamba_scan: tensors must be contiguous float32 CPU tensors");
  }
  TORCH_CHECK(u.dim() == 4 && u.size(0) == 2, "bimamba_scan: u must be [2, batch, L, dim]");
  const int64_t batch = u.size(1), L = u.size(2), dim = u.size(3);
  TORCH_CHECK(At.dim() == 3 && At.size(0) == 2 && At.size(1) == 16 && At.size(2) == dim,
              "bimamba_scan: A must be [2, state = 16, dim]");
  const int64_t N = 16, R = dbl.size(-1) - 2 * N;
  TORCH_CHECK(dim % 16 == 0 && R >= 0 && dbl.numel() == 2 * batch * L * (R + 2 * N) &&
                  dt_w.numel() == 2 * R * dim && xz.numel() == batch * L * 2 * dim &&
                  D.numel() == 2 * dim && bias.numel() == 2 * dim && out.numel() == batch * L * dim,
              "bimamba_scan: shapes");
  const float* Ap = At.data_ptr<float>();
  for (int64_t i = 0; i < At.numel(); ++i)  // the decays use a 2^x that needs x <= 0
    TORCH_CHECK(Ap[i] <= 0.0f, "bimamba_scan: A must be <= 0 (A = -exp(A_log))");
  const float* p[7] = {xz.data_ptr<float>(), u.data_ptr<float>(), dbl.data_ptr<float>(), dt_w.data_ptr<float>(),
                       Ap, D.data_ptr<float>(), bias.data_ptr<float>()};
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, batch * (dim / 16), 1, [&](int64_t begin, int64_t end) {
    bimamba_blocks(p[0], p[1], p[2], p[3], p[4], p[5], p[6], op, batch, L, dim, R, sc, begin, end);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd_fused", &scan_fwd_fused, "selective scan forward over one chunk, exponentials fused (CPU)",
        py::arg("A"), py::arg("delta"), py::arg("u"), py::arg("B"), py::arg("C"), py::arg("state"), py::arg("y"),
        py::arg("t0"), py::arg("T"), py::arg("D") = py::none(), py::arg("z") = py::none(),
        py::arg("delta_bias") = py::none(), py::arg("delta_softplus") = false);
  m.def("scan_bwd_chunk", &scan_bwd_chunk, "selective scan backward over one chunk (CPU)");
  m.def("reduce_over_dim", &reduce_over_dim, "sum_d w[b,d,t] X[b,d,t,n] per group (CPU)");
  m.def("bimamba_conv_silu", &bimamba_conv_silu, "both directions' depthwise conv + silu, token-major (CPU)");
  m.def("bimamba_scan", &bimamba_scan, "both directions' gated selective scan, token-major (CPU)");
  m.def("num_threads", []() { return at::get_num_threads(); }, "ATen intra-op threads");
}
