// Fused multi-step LIF (forward and backward) on time-first, contiguous (T, N) arrays.
//
// Loaded with ctypes by spikingformer.kernels.cpu (no PyTorch headers). The element loops are
// written without branches (selects through integer masks, dtype conversions in integer and
// float arithmetic) so that g++ vectorises them on every x86-64 ISA, SSE2 to AVX-512;
// tests/test_kernels.py checks the vectoriser's verdict for an AVX2 and an AVX-512 build on the
// loops marked "SF_VECTOR_LOOP" below.
//
// Forward arithmetic is the reference's operation for operation (compiled without fast-math and
// with -ffp-contract=off), so the spikes are bit-identical to it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The library is this one source compiled as several translation units at once (part k with
// -DSF_PART=k, spikingformer.kernels.cpu_backend.PARTS), so that a machine with several cores
// builds it in a fraction of the time; part k defines only the extern "C" functions of its part.
// Compiled without SF_PART (one translation unit) it defines them all.
#ifdef SF_PART
#define SF_IN_PART(k) (SF_PART == (k))
#else
#define SF_IN_PART(k) 1
#endif

// SF_FMA: std::fma is one instruction here and vectorises: x86 with FMA (AVX2 builds, AVX-512), and
// every AArch64 CPU (fmadd, fmla). Elsewhere (x86-64 baseline, SSE2) it would be a libm call per
// element, so the kernels offer no fused rounding there.
#if defined(__FMA__) || defined(__AVX512F__) || defined(__ARM_FEATURE_FMA)
#define SF_FMA 1
#else
#define SF_FMA 0
#endif

// SF_IVDEP, before a loop: its arrays never alias, so the vectorised loop needs no run-time alias
// checks (and, with many arrays, gets vectorised at all). g++'s "ivdep"; clang ignores GCC's loop
// pragmas and left the fused backward's loops scalar without its own (5x slower).
#if defined(__clang__)
#define SF_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define SF_IVDEP _Pragma("GCC ivdep")
#endif

namespace {

constexpr int64_t kBlock = 256;  // elements per block: membrane + T-step scratch stay in L1/L2

// ---- bit casts and a branch-free select ---------------------------------------------------------
inline uint32_t to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// c ? a : b through an all-ones/all-zeros mask: gcc if-converts a float "?:" only when it may
// ignore floating-point traps (AVX2 without -fno-trapping-math keeps it a branch).
inline float select(bool c, float a, float b) {
  const uint32_t m = 0u - (uint32_t)c;
  return from_bits((to_bits(a) & m) | (to_bits(b) & ~m));
}

// ---- storage dtypes (code 0: float32, 1: float16, 2: bfloat16) ----------------------------------
enum Dtype { kF32 = 0, kF16 = 1, kBF16 = 2 };
constexpr int kSpikeBytes = 3;  // spikes as bytes (0 or 1) in a kernel's scratch: never a tensor's dtype
template <int D> struct StorageOf { using type = uint16_t; };
template <> struct StorageOf<kF32> { using type = float; };
template <> struct StorageOf<kSpikeBytes> { using type = uint8_t; };

// f(std::integral_constant<int, D>{}) for the storage dtype whose code is dtype; false (f not
// called) for any other code. The one place that turns a code into a kernel's instantiation.
template <typename F> inline bool with_storage(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(std::integral_constant<int, kF32>{}); return true;
    case kF16: f(std::integral_constant<int, kF16>{}); return true;
    case kBF16: f(std::integral_constant<int, kBF16>{}); return true;
  }
  return false;
}

// IEEE half <-> float, round to nearest even, as c10::Half (the FP16 library's bit-level algorithm,
// written with integer selects so that it vectorises without F16C).
inline float half_to_float(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t m = 0u - (uint32_t)(two_w < (1u << 27));
  return from_bits(sign | ((to_bits(denormalized) & m) | (to_bits(normalized) & ~m)));
}

inline uint16_t float_to_half(float f) {
  const float base0 = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  const uint32_t b = to_bits(from_bits((bias >> 1) + 0x07800000u) + base0);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  const uint32_t nan = 0u - (uint32_t)(shl1_w > 0xFF000000u);
  return (uint16_t)((sign >> 16) | ((0x7E00u & nan) | (nonsign & ~nan)));
}

inline float bf16_to_float(uint16_t h) { return from_bits((uint32_t)h << 16); }

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN -> 0x7FC0, as c10::BFloat16
  const uint32_t u = to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
  return (uint16_t)((0x7FC0u & nan) | (r & ~nan));
}

// f rounded to bfloat16 and back, bf16_to_float(float_to_bf16(f)), in 32 bits: the same bits for
// every one of the 2^32 inputs (tests/test_kernels.py checks them all), without the narrowing to 16
// bits and the widening back that the two calls vectorise to (about 9 vector instructions per 16
// values, not 11).
inline float bf16_round(float f) {
  const uint32_t u = to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t nan = 0u - (uint32_t)((u & 0x7FFFFFFFu) > 0x7F800000u);
  return from_bits((0x7FC00000u & nan) | (r & ~nan));
}

template <int D> inline float load(const typename StorageOf<D>::type* p, int64_t i) {
  if constexpr (D == kF32) return p[i];
  else if constexpr (D == kF16) return half_to_float(p[i]);
  else return bf16_to_float(p[i]);
}

template <int D> inline void store(typename StorageOf<D>::type* p, int64_t i, float v) {
  if constexpr (D == kF32) p[i] = v;
  else if constexpr (D == kF16) p[i] = float_to_half(v);
  else p[i] = float_to_bf16(v);
}

// A spike (fired: 1, else 0) in storage dtype D: 1.0's bits in that dtype, or 0. Spikes are exact in
// every dtype, so this is store()'s result without its rounding (a dozen vector instructions for
// bfloat16, more for float16).
template <int D> inline typename StorageOf<D>::type spike_bits(bool fired) {
  if constexpr (D == kF32) return select(fired, 1.0f, 0.0f);
  else if constexpr (D == kSpikeBytes) return (uint8_t)fired;
  else return (uint16_t)(0u - (uint32_t)fired) & (D == kF16 ? 0x3C00u : 0x3F80u);
}

// a * b + c: one rounding where the ISA has FMA (SF_FMA), two elsewhere. Used only on the backward
// path, whose results need not be bit-exact.
inline float mul_add(float a, float b, float c) {
#if SF_FMA
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) for float32, Cephes-style range reduction + degree-6 polynomial (~1 ulp), vectorisable.
inline float exp_f(float x) {
  x = select(x > 88.0f, 88.0f, select(x < -87.0f, -87.0f, x));  // std::min/max: a branch on SSE2
  // round to nearest with the 1.5*2^23 trick (|x*log2e| < 2^22): vectorises without libm
  float n = mul_add(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  float r = mul_add(n, -0.693359375f, x);
  r = mul_add(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  p = mul_add(p * r, r, r + 1.0f);
  const int32_t e = ((int32_t)n + 127) << 23;
  return p * from_bits((uint32_t)e);
}

// d/dz sigmoid(alpha z), computed like the reference: alpha * sig * (1 - sig).
inline float surrogate(float z, float alpha) {
  const float sig = 1.0f / (1.0f + exp_f(-(alpha * z)));
  return alpha * sig * (1.0f - sig);
}

// One step of the reference, operation for operation:
//   H = V + (X - (V - V_reset)) / tau;  S = (H - V_th) >= 0;  V = H * (1 - S) + V_reset * S.
// When tau is a power of two, 1/tau is exact and "* inv_tau" rounds exactly as "/ tau" does;
// with -ffp-contract=off "V + B * inv_tau" is never fused.
struct Step {
  float tau, inv_tau, vth, vr;
  template <bool POW2> float charge(float v, float x) const {
    return POW2 ? v + (x - (v - vr)) * inv_tau : v + (x - (v - vr)) / tau;
  }
  // The reference's spike, S = (H - V_th) >= 0: the same as H >= V_th for every H (a difference of
  // two floats is zero only when they are equal), one operation fewer. Stored with spike_bits.
  bool fires(float h) const { return h >= vth; }
  // The reference's reset, H * (1 - S) + V_reset * S, as a select on the spike's comparison: where
  // S = 1 it is H * 0 + V_reset, the same bits (a NaN where H is infinite, as the reference's);
  // where S = 0 it is H itself, where the reference's H + V_reset * 0 may turn a -0 into +0, which
  // changes no spike and no gradient (at most the sign of a zero membrane). Two operations fewer.
  float reset(float h) const { return select(fires(h), h * 0.0f + vr, h); }
  // One step of the reverse recurrence: from the charged membrane h, the spike's gradient gs and
  // dL/dV[t] in gv, returns dL/dX[t] and leaves dL/dV[t-1] in gv.
  template <bool DETACH> float grad(float h, float gs, float& gv, float alpha) const {
    const float z = h - vth;
    const float sg = surrogate(z, alpha);
    const float not_spiked = select(z >= 0.0f, 0.0f, 1.0f);
    // dV/dH: 1 - S, plus the path through the reset, (V_reset - H) sg, unless it is detached
    const float dvdh = DETACH ? not_spiked : mul_add(vr - h, sg, not_spiked);
    const float gh = mul_add(gs, sg, gv * dvdh);
    const float g = gh * inv_tau;  // gradients need not be bit-exact: multiply (1 ulp of 1/tau)
    gv = gh - g;
    return g;
  }
};

template <int D, bool POW2>
void forward_block(const typename StorageOf<D>::type* __restrict x, typename StorageOf<D>::type* __restrict out,
                   int64_t T, int64_t N, int64_t i0, int64_t n, const Step& st) {
  using S = typename StorageOf<D>::type;
  float v[kBlock];
  for (int64_t i = 0; i < n; ++i) v[i] = st.vr;
  for (int64_t t = 0; t < T; ++t) {
    const S* __restrict xt = x + t * N + i0;
    S* __restrict ot = out + t * N + i0;
    for (int64_t i = 0; i < n; ++i) {  // SF_VECTOR_LOOP forward
      const float h = st.charge<POW2>(v[i], load<D>(xt, i));
      v[i] = st.reset(h);
      ot[i] = spike_bits<D>(st.fires(h));
    }
  }
}

template <int D, bool POW2, bool DETACH>
void backward_block(const typename StorageOf<D>::type* __restrict x, const typename StorageOf<D>::type* __restrict gs,
                    typename StorageOf<D>::type* __restrict gx, int64_t T, int64_t N, int64_t i0, int64_t n,
                    const Step& st, float alpha, float* __restrict hbuf) {
  using S = typename StorageOf<D>::type;
  float v[kBlock];
  float gv[kBlock];
  for (int64_t i = 0; i < n; ++i) v[i] = st.vr;
  for (int64_t t = 0; t < T; ++t) {  // recompute H for this block
    const S* __restrict xt = x + t * N + i0;
    float* __restrict ht = hbuf + t * kBlock;
    for (int64_t i = 0; i < n; ++i) {  // SF_VECTOR_LOOP backward recompute
      const float h = st.charge<POW2>(v[i], load<D>(xt, i));
      v[i] = st.reset(h);
      ht[i] = h;
    }
  }
  for (int64_t i = 0; i < n; ++i) gv[i] = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* __restrict ht = hbuf + t * kBlock;
    const S* __restrict gst = gs + t * N + i0;
    S* __restrict gxt = gx + t * N + i0;
    for (int64_t i = 0; i < n; ++i) {  // SF_VECTOR_LOOP backward
      store<D>(gxt, i, st.grad<DETACH>(ht[i], load<D>(gst, i), gv[i], alpha));
    }
  }
}

// Below ~256k elements one thread is about as fast, and never waits on a descheduled worker.
inline int threads_for(int64_t work, int nthreads) {
  return (work >= (int64_t)1 << 18) ? std::max(1, nthreads) : 1;
}

template <int D, bool POW2>
void forward_impl(const void* x, void* out, int64_t T, int64_t N, const Step& st, int nthreads) {
  using S = typename StorageOf<D>::type;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const int nt = threads_for(T * N, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t i0 = b * kBlock;
    forward_block<D, POW2>((const S*)x, (S*)out, T, N, i0, std::min(kBlock, N - i0), st);
  }
}

template <int D, bool POW2, bool DETACH>
void backward_impl(const void* x, const void* gs, void* gx, int64_t T, int64_t N, const Step& st, float alpha,
                   int nthreads) {
  using S = typename StorageOf<D>::type;
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const int nt = threads_for(T * N, nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> hbuf((size_t)(T * kBlock));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t i0 = b * kBlock;
      backward_block<D, POW2, DETACH>((const S*)x, (const S*)gs, (S*)gx, T, N, i0, std::min(kBlock, N - i0), st,
                                      alpha, hbuf.data());
    }
  }
}

// 1/tau exactly representable (tau a power of two)?
bool pow2_tau(float tau) { int e; return std::frexp(tau, &e) == 0.5f; }

template <int D>
void forward_dispatch(const void* x, void* out, int64_t T, int64_t N, const Step& st, int nthreads) {
  if (pow2_tau(st.tau)) forward_impl<D, true>(x, out, T, N, st, nthreads);
  else forward_impl<D, false>(x, out, T, N, st, nthreads);
}

template <int D>
void backward_dispatch(const void* x, const void* gs, void* gx, int64_t T, int64_t N, const Step& st, float alpha,
                       int detach, int nthreads) {
  const bool p2 = pow2_tau(st.tau);
  if (detach) {
    if (p2) backward_impl<D, true, true>(x, gs, gx, T, N, st, alpha, nthreads);
    else backward_impl<D, false, true>(x, gs, gx, T, N, st, alpha, nthreads);
  } else {
    if (p2) backward_impl<D, true, false>(x, gs, gx, T, N, st, alpha, nthreads);
    else backward_impl<D, false, false>(x, gs, gx, T, N, st, alpha, nthreads);
  }
}

}  // namespace

#if SF_IN_PART(0)
extern "C" {

int sf_lif_abi_version() { return 3; }

// dtype: 0 float32, 1 float16, 2 bfloat16. Returns 0 on success, -1 for an unknown dtype.
int sf_lif_forward(const void* x, void* out, int64_t T, int64_t N, float tau, float vth, float vr, int dtype,
                   int nthreads) {
  const Step st{tau, 1.0f / tau, vth, vr};
  const bool known = with_storage(dtype, [&](auto d) { forward_dispatch<d.value>(x, out, T, N, st, nthreads); });
  return known ? 0 : -1;
}

int sf_lif_backward(const void* x, const void* gs, void* gx, int64_t T, int64_t N, float tau, float vth, float vr,
                    float alpha, int detach, int dtype, int nthreads) {
  const Step st{tau, 1.0f / tau, vth, vr};
  const bool known = with_storage(dtype, [&](auto d) {
    backward_dispatch<d.value>(x, gs, gx, T, N, st, alpha, detach, nthreads);
  });
  return known ? 0 : -1;
}

}  // extern "C"
#endif  // part 0
