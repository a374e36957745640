// Spike attention's products (layers/blocks.py spike_attention, route fused_attention): for token
// rows q, k, v (R, N, C), head h the channels [h d, (h + 1) d), y = (Q_h (K_h^T V_h)) * scale in the
// same rows. PyTorch's batched product needs each head's (N, d) block contiguous: it copies q, k and
// v into head-major layouts and its result back (in the event model those copies took longer than
// the products). Here each head's d x d K^T V is summed in vector registers straight from the rows,
// then each token's row of Q K^T V, so nothing is copied but a head's q and k as float32 (for the
// broadcasts). Sums in float32 (exact for spikes: integers below 2^24); K^T V, then Q K^T V rounded
// to the storage dtype as PyTorch's products store them, then times the scale, rounded again: the
// plain path's values, bit for bit for spikes (tests/test_attention.py). The backward does the
// batched products' backward the same way (four products of d x d matrices with token rows, each
// rounded to the dtype). Appended after spike_conv_cpu.cpp (one library source, lif_cpu.cpp's helpers).
//
// GCC's vector extensions (clang has them too): one register of floats per Vec, kLanes wide (16
// with AVX-512, 8 with AVX2, 4 elsewhere: spike_linear_cpu.cpp's, earlier in the library source);
// the accumulators of a block are kAccRegs registers, half the ISA's, so that nothing spills (an
// AVX2 build with AVX-512's blocks spilled and ran 10x slower).
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
namespace attention {

constexpr int kAccRegs = kLanes == 16 ? 16 : 8;  // AVX-512 has 32 vector registers, AVX2 and SSE 16
using VecF = Vec;
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

  // sums = A^T B over the head's N tokens (d x d), rounded to D: a as float32 rows (N, d), b rows
  // of dtype DB with stride sb; IB rows of the sums at a time in registers
  template <int DB> static void outer_sums(const float* a, const typename StorageOf<DB>::type* b, int64_t sb,
                                           int64_t N, VecF (*sums)[DV]) {
    for (int i0 = 0; i0 < d; i0 += IB) {
      VecF acc[IB][DV] = {};
      for (int64_t n = 0; n < N; ++n) {
        VecF bn[DV];
        for (int c = 0; c < DV; ++c) bn[c] = load_vec<DB>(b + n * sb + c * kLanes);
        const float* an = a + n * d + i0;
        for (int i = 0; i < IB; ++i)
          for (int c = 0; c < DV; ++c) acc[i][c] = mul_add_vec(an[i], bn[c], acc[i][c]);
      }
      for (int i = 0; i < IB; ++i)
        for (int c = 0; c < DV; ++c) sums[i0 + i][c] = round_vec<D>(acc[i][c]);
    }
  }

  // rows [n0, n0 + NT) of y = (A m) * scale, each product rounded to D, then the scale's product;
  // a: float32 rows (N, d), y: rows of stride C
  template <int NT> static void product_rows(const float* a, const VecF (*m)[DV], int64_t n0, int64_t C, float scale,
                                             S* y) {
    VecF acc[NT][DV] = {};
    for (int i = 0; i < d; ++i)
      for (int t = 0; t < NT; ++t) {
        const float an = a[(n0 + t) * d + i];
        for (int c = 0; c < DV; ++c) acc[t][c] = mul_add_vec(an, m[i][c], acc[t][c]);
      }
    for (int t = 0; t < NT; ++t)
      for (int c = 0; c < DV; ++c)
        store_vec<D>(y + (n0 + t) * C + c * kLanes, round_vec<D>(round_vec<D>(acc[t][c]) * scale));
  }

  static void products(const float* a, const VecF (*m)[DV], int64_t N, int64_t C, float scale, S* y) {
    int64_t n0 = 0;
    for (; n0 + NB <= N; n0 += NB) product_rows<NB>(a, m, n0, C, scale, y);
    for (; n0 < N; ++n0) product_rows<1>(a, m, n0, C, scale, y);
  }

  // the head's rows of x (stride C) as float32 rows (N, d), each times scale rounded to D (scale 1: as they are)
  static void head_rows(const S* x, int64_t N, int64_t C, float scale, float* out) {
    for (int64_t n = 0; n < N; ++n)
      for (int c = 0; c < DV; ++c) {
        const VecF xn = scale == 1.0f ? load_vec<D>(x + n * C + c * kLanes)
                                      : round_vec<D>(load_vec<D>(x + n * C + c * kLanes) * scale);
        std::memcpy(out + n * d + c * kLanes, &xn, sizeof xn);
      }
  }

  static void transpose(const VecF (*m)[DV], VecF (*t)[DV]) {
    float a[d][d], b[d][d];
    std::memcpy(a, m, sizeof a);
    for (int i = 0; i < d; ++i)
      for (int j = 0; j < d; ++j) b[j][i] = a[i][j];
    std::memcpy(t, b, sizeof b);
  }

  // body(rh, scratch) for every head rh = r H + h of the R rows, in parallel; scratch: `arrays`
  // float32 (N, d) arrays of this thread
  template <typename F> static void each_head(int64_t R, int64_t N, int64_t C, int arrays, int nthreads, F&& body) {
    const int64_t H = C / d;
    const int nt = R * H >= 2 ? std::max(1, nthreads) : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      std::vector<float> scratch(arrays * N * d);
#pragma omp for schedule(static)
      for (int64_t rh = 0; rh < R * H; ++rh) body((rh / H) * N * C + (rh % H) * d, scratch.data());
    }
  }

  // y = (Q (K^T V)) * scale
  static void forward(const S* q, const S* k, const S* v, S* y, int64_t R, int64_t N, int64_t C, float scale,
                      int nthreads) {
    each_head(R, N, C, 2, nthreads, [&](int64_t at, float* scratch) {
      float *kf = scratch, *qf = scratch + N * d;
      VecF kv[d][DV];
      head_rows(k + at, N, C, 1.0f, kf);
      head_rows(q + at, N, C, 1.0f, qf);
      outer_sums<D>(kf, v + at, C, N, kv);
      products(qf, kv, N, C, scale, y + at);
    });
  }

  // the gradients of forward's y: with G = gy * scale and M = K^T V (each rounded to D),
  // gq = G M^T, gM = Q^T G, gk = V gM^T, gv = K gM (each rounded to D), as the products' backward
  static void backward(const S* q, const S* k, const S* v, const S* gy, S* gq, S* gk, S* gv, int64_t R, int64_t N,
                       int64_t C, float scale, int nthreads) {
    each_head(R, N, C, 4, nthreads, [&](int64_t at, float* scratch) {
      float *kf = scratch, *qf = scratch + N * d, *vf = scratch + 2 * N * d, *gf = scratch + 3 * N * d;
      VecF m[d][DV], gm[d][DV], t[d][DV];
      head_rows(k + at, N, C, 1.0f, kf);
      head_rows(q + at, N, C, 1.0f, qf);
      head_rows(v + at, N, C, 1.0f, vf);
      head_rows(gy + at, N, C, scale, gf);
      outer_sums<kF32>(kf, vf, d, N, m);
      outer_sums<kF32>(qf, gf, d, N, gm);
      products(kf, gm, N, C, 1.0f, gv + at);
      transpose(m, t);
      products(gf, t, N, C, 1.0f, gq + at);
      transpose(gm, t);
      products(vf, t, N, C, 1.0f, gk + at);
    });
  }
};

// f(HeadProducts<D, d / 16>{}) for head dimension d; false (nothing called) for any other d
template <int D, typename F> bool with_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 16: f(HeadProducts<D, 1>{}); return true;
    case 32: f(HeadProducts<D, 2>{}); return true;
    case 48: f(HeadProducts<D, 3>{}); return true;
    case 64: f(HeadProducts<D, 4>{}); return true;
  }
  return false;
}

// f(HeadProducts<D, d / 16>{}) for a dtype code (D) and head dimension d the kernels take: 0; -2
// (nothing called) for others
template <typename F> int with_kernel(int dtype, int64_t C, int64_t d, F&& f) {
  if (d <= 0 || C % d) return -2;
  bool done = false;
  if (dtype == kF32) done = with_head_dim<kF32>(d, f);
  if (dtype == kBF16) done = with_head_dim<kBF16>(d, f);
  return done ? 0 : -2;
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
  return attention::with_kernel(dtype, C, d, [&](auto heads) {
    using S = typename decltype(heads)::S;
    heads.forward(static_cast<const S*>(q), static_cast<const S*>(k), static_cast<const S*>(v), static_cast<S*>(y),
                  R, N, C, scale, nthreads);
  });
}

// The gradients gq, gk, gv (R, N, C, contiguous, the dtype of q) of sf_spike_attention's y for its
// gradient gy, as the batched products' backward computes them. Returns as sf_spike_attention.
int sf_spike_attention_backward(const void* q, const void* k, const void* v, const void* gy, void* gq, void* gk,
                                void* gv, int64_t R, int64_t N, int64_t C, int64_t d, int dtype, float scale,
                                int nthreads) {
  return attention::with_kernel(dtype, C, d, [&](auto heads) {
    using S = typename decltype(heads)::S;
    heads.backward(static_cast<const S*>(q), static_cast<const S*>(k), static_cast<const S*>(v),
                   static_cast<const S*>(gy), static_cast<S*>(gq), static_cast<S*>(gk), static_cast<S*>(gv), R, N, C,
                   scale, nthreads);
  });
}

}  // extern "C"
#endif

#undef SF_CONTRACT
#if !defined(__clang__)
#pragma GCC pop_options
#endif
