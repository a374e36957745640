// Spike attention's products (layers/blocks.py spike_attention, route fused_attention): for token
// rows q, k, v (R, N, C), head h the channels [h d, (h + 1) d), y = (Q_h (K_h^T V_h)) * scale in the
// same rows. PyTorch's batched product needs each head's (N, d) block contiguous: it copies q, k and
// v into head-major layouts and its result back (in the event model those copies took longer than
// the products). Here each head's d x d K^T V is summed in vector registers straight from the rows,
// then each token's row of Q K^T V, so nothing is copied but a head's q and k as float32 (for the
// broadcasts). Sums in float32 (exact for spikes: integers below 2^24); K^T V, then Q K^T V rounded
// to the storage dtype as PyTorch's products store them, then times the scale, rounded again: the
// plain path's values, bit for bit for spikes (tests/test_attention.py). Appended after
// spike_conv_cpu.cpp (one library source, lif_cpu.cpp's helpers).
//
// GCC's vector extensions (clang has them too): one register of floats per VecF, 16 lanes with
// AVX-512, 8 with AVX2, 4 elsewhere; the accumulators of a block are kAccRegs registers, half the
// ISA's, so that nothing spills (an AVX2 build with AVX-512's blocks spilled and ran 10x slower).
// Multiply-adds contract to FMA here only (the library is built with -ffp-contract=off): each
// product of spikes is exact, so the rounding is the same.
#if defined(__clang__)
#define SF_CONTRACT _Pragma("clang fp contract(fast)")
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#define SF_CONTRACT
#endif

namespace {
namespace attention {  // its names apart from the other parts' (kLanes, ...)

#if defined(__AVX512F__)
constexpr int kLanes = 16, kAccRegs = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8, kAccRegs = 8;
#else
constexpr int kLanes = 4, kAccRegs = 8;
#endif
typedef float VecF __attribute__((vector_size(4 * kLanes)));
typedef uint32_t VecU __attribute__((vector_size(4 * kLanes)));
typedef uint16_t VecH __attribute__((vector_size(2 * kLanes)));

template <typename T, typename F> inline T bit_cast_vec(const F& f) {
  static_assert(sizeof(T) == sizeof(F), "same size");
  T t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}

template <int D> inline VecF load_vec(const typename StorageOf<D>::type* p) {
  if constexpr (D == kF32) {
    VecF x;
    std::memcpy(&x, p, sizeof x);
    return x;
  } else {
    VecH h;
    std::memcpy(&h, p, sizeof h);
    return bit_cast_vec<VecF>(__builtin_convertvector(h, VecU) << 16);
  }
}

// x rounded to storage dtype D and back (bf16_round of lif_cpu.cpp, lane by lane: NaN -> 0x7FC0)
template <int D> inline VecF round_vec(VecF x) {
  if constexpr (D == kF32) {
    return x;
  } else {
    const VecU u = bit_cast_vec<VecU>(x);
    const VecU r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    const VecU nan = (VecU)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return bit_cast_vec<VecF>((0x7FC00000u & nan) | (r & ~nan));
  }
}

// a value already rounded to D (round_vec) stored in D
template <int D> inline void store_vec(typename StorageOf<D>::type* p, VecF x) {
  if constexpr (D == kF32) {
    std::memcpy(p, &x, sizeof x);
  } else {
    const VecH h = __builtin_convertvector(bit_cast_vec<VecU>(x) >> 16, VecH);
    std::memcpy(p, &h, sizeof h);
  }
}

inline VecF mul_add_vec(float a, VecF b, VecF c) {
  SF_CONTRACT
  return a * b + c;
}

// the largest divisor of n that is at most cap (at least 1)
constexpr int divisor_up_to(int n, int cap) {
  int best = 1;
  for (int i = 1; i <= cap && i <= n; ++i)
    if (n % i == 0) best = i;
  return best;
}

// Head dimension d = 16 M (M = 1 to 4): DV registers a row of d floats.
template <int D, int M> struct HeadProducts {
  using S = typename StorageOf<D>::type;
  static constexpr int d = 16 * M, DV = d / kLanes;
  static constexpr int IB = divisor_up_to(d, kAccRegs / DV > 0 ? kAccRegs / DV : 1);  // rows of K^T V per block
  static constexpr int NB = kAccRegs / DV > 0 ? kAccRegs / DV : 1;                    // tokens per block of Q K^T V

  // kv = K^T V of one head, rounded to D; kf: the head's k rows as float32 (N, d)
  static void key_values(const float* kf, const S* v, int64_t N, int64_t C, VecF (*kv)[DV]) {
    for (int i0 = 0; i0 < d; i0 += IB) {
      VecF acc[IB][DV] = {};
      for (int64_t n = 0; n < N; ++n) {
        VecF vv[DV];
        for (int b = 0; b < DV; ++b) vv[b] = load_vec<D>(v + n * C + b * kLanes);
        const float* kn = kf + n * d + i0;
        for (int i = 0; i < IB; ++i)
          for (int b = 0; b < DV; ++b) acc[i][b] = mul_add_vec(kn[i], vv[b], acc[i][b]);
      }
      for (int i = 0; i < IB; ++i)
        for (int b = 0; b < DV; ++b) kv[i0 + i][b] = round_vec<D>(acc[i][b]);
    }
  }

  // y rows [n0, n0 + NT) of the head: (q K^T V) * scale; qf: the head's q rows as float32 (N, d)
  template <int NT> static void outputs(const float* qf, const VecF (*kv)[DV], int64_t n0, int64_t C, float scale,
                                        S* y) {
    VecF acc[NT][DV] = {};
    for (int i = 0; i < d; ++i)
      for (int t = 0; t < NT; ++t) {
        const float qv = qf[(n0 + t) * d + i];
        for (int b = 0; b < DV; ++b) acc[t][b] = mul_add_vec(qv, kv[i][b], acc[t][b]);
      }
    for (int t = 0; t < NT; ++t)
      for (int b = 0; b < DV; ++b)
        store_vec<D>(y + (n0 + t) * C + b * kLanes, round_vec<D>(round_vec<D>(acc[t][b]) * scale));
  }

  static void run(const S* q, const S* k, const S* v, S* y, int64_t R, int64_t N, int64_t C, float scale, int nthreads) {
    const int64_t H = C / d;
    const int nt = R * H >= 2 ? std::max(1, nthreads) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      std::vector<float> rows(2 * N * d);
      float* kf = rows.data();
      float* qf = kf + N * d;
      VecF kv[d][DV];
#pragma omp for schedule(static)
      for (int64_t rh = 0; rh < R * H; ++rh) {
        const int64_t at = (rh / H) * N * C + (rh % H) * d;  // the head's first channel in its first token row
        for (int64_t n = 0; n < N; ++n)
          for (int b = 0; b < DV; ++b) {
            const VecF kn = load_vec<D>(k + at + n * C + b * kLanes), qn = load_vec<D>(q + at + n * C + b * kLanes);
            std::memcpy(kf + n * d + b * kLanes, &kn, sizeof kn);
            std::memcpy(qf + n * d + b * kLanes, &qn, sizeof qn);
          }
        key_values(kf, v + at, N, C, kv);
        int64_t n0 = 0;
        for (; n0 + NB <= N; n0 += NB) outputs<NB>(qf, kv, n0, C, scale, y + at);
        for (; n0 < N; ++n0) outputs<1>(qf, kv, n0, C, scale, y + at);
      }
    }
  }
};

template <int D> int attention_of(const void* q, const void* k, const void* v, void* y, int64_t R, int64_t N,
                                  int64_t C, int64_t d, float scale, int nthreads) {
  using S = typename StorageOf<D>::type;
  const S *qs = static_cast<const S*>(q), *ks = static_cast<const S*>(k), *vs = static_cast<const S*>(v);
  S* ys = static_cast<S*>(y);
  switch (d) {
    case 16: HeadProducts<D, 1>::run(qs, ks, vs, ys, R, N, C, scale, nthreads); return 0;
    case 32: HeadProducts<D, 2>::run(qs, ks, vs, ys, R, N, C, scale, nthreads); return 0;
    case 48: HeadProducts<D, 3>::run(qs, ks, vs, ys, R, N, C, scale, nthreads); return 0;
    case 64: HeadProducts<D, 4>::run(qs, ks, vs, ys, R, N, C, scale, nthreads); return 0;
  }
  return -2;
}

}  // namespace attention
}  // namespace

#if SF_IN_PART(0)
extern "C" {

// y = (Q_h (K_h^T V_h)) * scale for every head h of d channels (see the top of this file): q, k, v, y
// contiguous (R, N, C) of dtype code float32 or bfloat16, C a multiple of d. Returns 0; -2 for a head
// dimension other than 16, 32, 48 or 64 or another dtype, computing nothing.
int sf_spike_attention(const void* q, const void* k, const void* v, void* y, int64_t R, int64_t N, int64_t C,
                       int64_t d, int dtype, float scale, int nthreads) {
  if (d <= 0 || C % d) return -2;
  if (dtype == kF32) return attention::attention_of<kF32>(q, k, v, y, R, N, C, d, scale, nthreads);
  if (dtype == kBF16) return attention::attention_of<kBF16>(q, k, v, y, R, N, C, d, scale, nthreads);
  return -2;
}

}  // extern "C"
#endif

#undef SF_CONTRACT
#if !defined(__clang__)
#pragma GCC pop_options
#endif
