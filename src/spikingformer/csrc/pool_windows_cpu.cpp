// Channels-last maps and the max-pool's windows, for the tokenizer kernel (lif_pool_cpu.cpp, which
// follows in the one library source; select, load and the storage dtypes come from lif_cpu.cpp).
//
// Maps are (T, B, H, W, C), contiguous: the channels-last feature maps of T*B images, the neuron's
// time axis first. The max-pool is the tokenizer's MaxPool2d(kernel 3, stride 2, padding 1), out
// (T, B, Ho, Wo, C) with Ho = (H - 1) / 2 + 1 (likewise Wo). Its backward sends each window's
// gradient to the window's first maximum in scan order (PyTorch's tie-break), summed in PyTorch's
// raster order of windows, each sum rounded to the storage dtype as PyTorch's kernel stores it.
namespace {

struct Maps {
  int64_t T, B, H, W, C;
  int64_t Ho() const { return (H - 1) / 2 + 1; }
  int64_t Wo() const { return (W - 1) / 2 + 1; }
  int64_t WC() const { return W * C; }
  int64_t WoC() const { return Wo() * C; }
};

// The larger of a pooled spike o (storage D) and a spike s (a byte, 0 or 1), in D: o where s is 0,
// else 1 (1.0's bits in D, spike_bits).
template <int D> inline typename StorageOf<D>::type spike_max(typename StorageOf<D>::type o, uint8_t s) {
  static_assert(D == kF32 || D == kBF16, "the tokenizer kernel stores float32 or bfloat16 maps");
  if constexpr (D == kF32) return select(s != 0, 1.0f, o);
  else return o | spike_bits<D>(s != 0);  // o is 0 or 1's bits
}

// Horizontal 3-wide, stride-2 max of n columns' spikes (bytes, C each, from column 1 of s) into hp:
// window j's columns are s's 2j, 2j + 1 and 2j + 2, the last clamped to 2j + 1 where s has no
// column 2j + 2 (the map's right edge). Column 0 of s is the column left of the first (at the
// map's left edge, a copy of column 1: max(a, a, b) = max(a, b)). The max of 0s and 1s is their or.
inline void pool_cols(const uint8_t* __restrict s, uint8_t* __restrict hp, int64_t n, int64_t C) {
  for (int64_t j = 0; 2 * j < n; ++j) {
    const uint8_t* __restrict l = s + 2 * j * C;
    const uint8_t* __restrict mid = l + C;
    const uint8_t* __restrict r = 2 * j + 2 <= n ? l + 2 * C : mid;
    uint8_t* __restrict o = hp + j * C;
    for (int64_t c = 0; c < C; ++c) o[c] = l[c] | mid[c] | r[c];
  }
}

// A float rounded to storage dtype D (float32 or bfloat16) and back: what storing a sum in D and
// reading it again gives.
template <int D> inline float round_to(float v) {
  static_assert(D == kF32 || D == kBF16, "the tokenizer kernel stores float32 or bfloat16 maps");
  if constexpr (D == kF32) return v;
  else return bf16_round(v);
}

// Spike rows of the backward are kept with their even columns first, then their odd ones: column
// w at (w even: w / 2, w odd: Wo + w / 2) * C, so that window ow's columns 2ow - 1, 2ow, 2ow + 1
// lie at odd ow - 1, even ow and odd ow, contiguous over (ow, c) (the window loops run over Wo*C).
inline int64_t split_col(int64_t w, const Maps& m) { return (w & 1) ? m.Wo() + w / 2 : w / 2; }

// Where n windows' gradients go: for each, the position 3 r + j (window row r, column j) of its
// first maximum in scan order, as PyTorch's max_pool2d picks it, into code. a{r}{j}: the spikes
// (bytes) of position (r, j) of each window; a position in the padding is given as a copy of its
// neighbour in the map and never picked (top_in / left_in: whether row 0 / column 0 lie in the map).
inline void first_maxima(const uint8_t* __restrict a00, const uint8_t* __restrict a01, const uint8_t* __restrict a02,
                         const uint8_t* __restrict a10, const uint8_t* __restrict a11, const uint8_t* __restrict a12,
                         const uint8_t* __restrict a20, const uint8_t* __restrict a21, const uint8_t* __restrict a22,
                         uint8_t* __restrict code, int64_t n, bool top_in, bool left_in) {
  // all-ones masks of the positions that may win (a ?: on bytes would stay a branch for g++)
  const uint8_t row0 = (uint8_t)(0 - (uint8_t)top_in), col0 = (uint8_t)(0 - (uint8_t)left_in);
  for (int64_t i = 0; i < n; ++i) {  // SF_VECTOR_LOOP lif_pool window maximum
    const uint8_t m = a00[i] | a01[i] | a02[i] | a10[i] | a11[i] | a12[i] | a20[i] | a21[i] | a22[i];
    // spikes are 0 or 1, so (a ^ m) - 1 is all ones where a == m, else 0
    auto is_max = [m](uint8_t a) { return (uint8_t)((a ^ m) - 1); };
    auto pick = [](uint8_t mask, uint8_t k, uint8_t f) { return (uint8_t)((k & mask) | (f & ~mask)); };
    uint8_t f = 8;
    f = pick(is_max(a21[i]), 7, f);
    f = pick(is_max(a20[i]) & col0, 6, f);
    f = pick(is_max(a12[i]), 5, f);
    f = pick(is_max(a11[i]), 4, f);
    f = pick(is_max(a10[i]) & col0, 3, f);
    f = pick(is_max(a02[i]) & row0, 2, f);
    f = pick(is_max(a01[i]) & row0, 1, f);
    f = pick(is_max(a00[i]) & row0 & col0, 0, f);
    code[i] = f;
  }
}

// The codes (first_maxima) of output row oh's windows at step t, code[ow * C + c], from the spike
// rows in the ring (5 rows, split columns).
inline void window_codes(const uint8_t* spikes, const Maps& m, int64_t oh, int64_t t, uint8_t* code) {
  const int64_t WC = m.WC(), WoC = m.WoC(), C = m.C, odd = (m.W / 2) * C;  // odd: W / 2 odd columns
  const int64_t rows[3] = {std::max<int64_t>(0, 2 * oh - 1), 2 * oh, std::min(m.H - 1, 2 * oh + 1)};
  const uint8_t* e[3];  // each row's even columns; its odd ones follow at + WoC
  for (int r = 0; r < 3; ++r) e[r] = spikes + ((rows[r] % 5) * m.T + t) * WC;
  // window 0: its left column is padding (a copy of column 0); column 1 is its right one if the map has it
  const int64_t r0 = m.W > 1 ? WoC : 0;
  first_maxima(e[0], e[0], e[0] + r0, e[1], e[1], e[1] + r0, e[2], e[2], e[2] + r0, code, C, oh > 0, false);
  // windows 1 .. W / 2 - 1, with all three columns: left = odd ow - 1, centre = even ow, right = odd ow
  const int64_t full = std::max<int64_t>(C, odd);
  if (full > C)
    first_maxima(e[0] + WoC, e[0] + C, e[0] + WoC + C, e[1] + WoC, e[1] + C, e[1] + WoC + C, e[2] + WoC, e[2] + C,
                 e[2] + WoC + C, code + C, full - C, oh > 0, true);
  // for odd W > 1, the last window has no right column (a copy of its centre, which comes first)
  if (full < WoC)
    first_maxima(e[0] + WoC + full - C, e[0] + full, e[0] + full, e[1] + WoC + full - C, e[1] + full, e[1] + full,
                 e[2] + WoC + full - C, e[2] + full, e[2] + full, code + full, WoC - full, oh > 0, true);
}

// The spike gradient of one input row (split columns: even at ge, odd at go; every element written)
// from the windows of the N output rows it lies in (1 or 2, in order): rows[k]'s codes code[k], its
// gradient g[k], r[k] the input row's window row there. Summed as PyTorch sums them, window by window
// in raster order: column 2ow (even) takes window ow's centre (code 3 r + 1) of each output row;
// column 2ow + 1 (odd) window ow's right (3 r + 2), then window ow + 1's left (3 r). Each sum is
// rounded to the storage dtype as PyTorch's kernel stores it; the first is 0 + a, exact (-0 -> +0).
template <int D, int N>
void route_rows(const uint8_t* const* code, const typename StorageOf<D>::type* const* g, const int* r,
                float* __restrict ge, float* __restrict go, const Maps& m) {
  using S = typename StorageOf<D>::type;
  const int64_t WoC = m.WoC(), C = m.C, odd = (m.W / 2) * C, left = (m.Wo() - 1) * C;
  const uint8_t* __restrict c0 = code[0];
  const uint8_t* __restrict c1 = code[N - 1];
  const S* __restrict g0 = g[0];
  const S* __restrict g1 = g[N - 1];
  const uint8_t l0 = (uint8_t)(3 * r[0]), l1 = (uint8_t)(3 * r[N - 1]);  // left; centre + 1, right + 2
  // window contribution: g at i where the code at i is the wanted position
  auto take = [](uint8_t code, uint8_t want, float g) { return select(code == want, g, 0.0f); };
  for (int64_t i = 0; i < WoC; ++i) {  // SF_VECTOR_LOOP lif_pool route centre
    float a = 0.0f + take(c0[i], l0 + 1, load<D>(g0, i));
    if constexpr (N == 2) a = round_to<D>(a + take(c1[i], l1 + 1, load<D>(g1, i)));
    ge[i] = a;
  }
  for (int64_t i = 0; i < left; ++i) {  // SF_VECTOR_LOOP lif_pool route right and left
    float a = 0.0f + take(c0[i], l0 + 2, load<D>(g0, i));
    a = round_to<D>(a + take(c0[i + C], l0, load<D>(g0, i + C)));
    if constexpr (N == 2) {
      a = round_to<D>(a + take(c1[i], l1 + 2, load<D>(g1, i)));
      a = round_to<D>(a + take(c1[i + C], l1, load<D>(g1, i + C)));
    }
    go[i] = a;
  }
  for (int64_t i = left; i < odd; ++i) {  // SF_VECTOR_LOOP lif_pool route right
    float a = 0.0f + take(c0[i], l0 + 2, load<D>(g0, i));
    if constexpr (N == 2) a = round_to<D>(a + take(c1[i], l1 + 2, load<D>(g1, i)));
    go[i] = a;
  }
}

}  // namespace
