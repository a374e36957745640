// Winograd's F(2x2, 3x3) transforms (kernels/winograd.py): each one pass over channels-last maps,
// OpenMP over 4x4 tiles (stride 2, padding 1), the channels in vector lanes, in the additions'
// order of their PyTorch twins (winograd.input_transform / output_transform), so the same bits.
// The 16 products between them are PyTorch's bmm. Maps and tiles in float32 or bfloat16 (dtype
// code, as with_storage): bfloat16 values are read into float32, transformed there and rounded
// once when stored, as the twins compute them.
#if SF_IN_PART(1)
namespace {
constexpr int64_t kWinogradChunk = 64;  // channels per inner pass: 16 x 64 floats of a tile in L1

// f(p, image, tile row, tile column) for every tile p of n maps h x w (4x4 tiles at stride 2, in
// (image, row, column) order), OpenMP over the tiles where there are 64 or more.
template <typename F> void for_each_tile(int64_t n, int64_t h, int64_t w, int nthreads, F&& f) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = n * th * tw;
  const int nt = tiles >= 64 ? std::max(1, nthreads) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < tiles; ++p) f(p, p / (th * tw), p / tw % th, p % tw);
}

// f(std::integral_constant<int, D>{}) for dtype code 0 (float32) or 2 (bfloat16): 0; -1 for another.
template <typename F> int with_float_or_bf16(int dtype, F&& f) {
  if (dtype != kF32 && dtype != kBF16) return -1;
  with_storage(dtype, f);
  return 0;
}
}  // namespace

// x (N, H, W, C) -> v (16, tiles, C), tiles = N ceil(H/2) ceil(W/2) in (image, row, column) order:
// V = B^T d B of each tile d, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
template <int D>
void winograd_input(const typename StorageOf<D>::type* x, typename StorageOf<D>::type* v, int64_t n, int64_t h,
                    int64_t w, int64_t c, int nthreads) {
  using S = typename StorageOf<D>::type;
  const int64_t tiles = n * ((h + 1) / 2) * ((w + 1) / 2);
  for_each_tile(n, h, w, nthreads, [&](int64_t p, int64_t b, int64_t ty, int64_t tx) {
    const S* at[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
        at[i][j] = y >= 0 && y < h && xx >= 0 && xx < w ? x + ((b * h + y) * w + xx) * c : nullptr;
      }
    for (int64_t c0 = 0; c0 < c; c0 += kWinogradChunk) {
      const int64_t cn = std::min(kWinogradChunk, c - c0);
      float d[4][4][kWinogradChunk], t[4][4][kWinogradChunk];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          if (at[i][j])
            for (int64_t e = 0; e < cn; ++e) d[i][j][e] = load<D>(at[i][j], c0 + e);
          else
            for (int64_t e = 0; e < cn; ++e) d[i][j][e] = 0.0f;
        }
      for (int j = 0; j < 4; ++j)
        for (int64_t e = 0; e < cn; ++e) {
          t[0][j][e] = d[0][j][e] - d[2][j][e];
          t[1][j][e] = d[1][j][e] + d[2][j][e];
          t[2][j][e] = d[2][j][e] - d[1][j][e];
          t[3][j][e] = d[1][j][e] - d[3][j][e];
        }
      for (int i = 0; i < 4; ++i) {
        S* out[4];
        for (int j = 0; j < 4; ++j) out[j] = v + ((int64_t)(4 * i + j) * tiles + p) * c + c0;
        for (int64_t e = 0; e < cn; ++e) {
          store<D>(out[0], e, t[i][0][e] - t[i][2][e]);
          store<D>(out[1], e, t[i][1][e] + t[i][2][e]);
          store<D>(out[2], e, t[i][2][e] - t[i][1][e]);
          store<D>(out[3], e, t[i][1][e] - t[i][3][e]);
        }
      }
    }
  });
}

// m (16, tiles, K) -> y (N, H, W, K): Y = A^T M A of each tile's 16 sums, A^T = [[1, 1, 1, 0],
// [0, 1, -1, -1]], plus the float32 bias[k] where bias is not null (added last).
template <int D>
void winograd_output(const typename StorageOf<D>::type* m, const float* bias, typename StorageOf<D>::type* y,
                     int64_t n, int64_t h, int64_t w, int64_t k, int nthreads) {
  using S = typename StorageOf<D>::type;
  const int64_t tiles = n * ((h + 1) / 2) * ((w + 1) / 2);
  for_each_tile(n, h, w, nthreads, [&](int64_t p, int64_t b, int64_t ty, int64_t tx) {
    for (int64_t k0 = 0; k0 < k; k0 += kWinogradChunk) {
      const int64_t kn = std::min(kWinogradChunk, k - k0);
      float wide[D == kF32 ? 1 : 16][kWinogradChunk];  // bfloat16 sums read into float32
      const float* in[16];
      for (int q = 0; q < 16; ++q) {
        const S* row = m + ((int64_t)q * tiles + p) * k + k0;
        if constexpr (D == kF32) {
          in[q] = row;
        } else {
          for (int64_t e = 0; e < kn; ++e) wide[q][e] = load<D>(row, e);
          in[q] = wide[q];
        }
      }
      float s[2][4][kWinogradChunk], o[2][2][kWinogradChunk];
      for (int j = 0; j < 4; ++j)
        for (int64_t e = 0; e < kn; ++e) {
          s[0][j][e] = in[j][e] + in[4 + j][e] + in[8 + j][e];
          s[1][j][e] = in[4 + j][e] - in[8 + j][e] - in[12 + j][e];
        }
      for (int a = 0; a < 2; ++a)
        for (int64_t e = 0; e < kn; ++e) {
          o[a][0][e] = s[a][0][e] + s[a][1][e] + s[a][2][e];
          o[a][1][e] = s[a][1][e] - s[a][2][e] - s[a][3][e];
        }
      if (bias)
        for (int a = 0; a < 2; ++a)
          for (int q = 0; q < 2; ++q)
            for (int64_t e = 0; e < kn; ++e) o[a][q][e] += bias[k0 + e];
      for (int a = 0; a < 2; ++a) {
        const int64_t yy = 2 * ty + a;
        if (yy >= h) continue;
        S* row = y + ((b * h + yy) * w + 2 * tx) * k + k0;
        for (int64_t e = 0; e < kn; ++e) store<D>(row, e, o[a][0][e]);
        if (2 * tx + 1 < w)
          for (int64_t e = 0; e < kn; ++e) store<D>(row + k, e, o[a][1][e]);
      }
    }
  });
}

// g (N, H, W, K) -> dm (16, tiles, K): dM = A dY A^T of each tile's 2x2 block dY of the output
// gradient (zeros beyond H and W), A = [[1, 0], [1, 1], [1, -1], [0, -1]]: the output transform's
// adjoint, which the weight gradient multiplies with the input's tiles.
template <int D>
void winograd_grad_tiles(const typename StorageOf<D>::type* g, typename StorageOf<D>::type* dm, int64_t n, int64_t h,
                         int64_t w, int64_t k, int nthreads) {
  using S = typename StorageOf<D>::type;
  const int64_t tiles = n * ((h + 1) / 2) * ((w + 1) / 2);
  for_each_tile(n, h, w, nthreads, [&](int64_t p, int64_t b, int64_t ty, int64_t tx) {
    const S* at[2][2];
    for (int a = 0; a < 2; ++a)
      for (int q = 0; q < 2; ++q) {
        const int64_t y = 2 * ty + a, xx = 2 * tx + q;
        at[a][q] = y < h && xx < w ? g + ((b * h + y) * w + xx) * k : nullptr;
      }
    for (int64_t k0 = 0; k0 < k; k0 += kWinogradChunk) {
      const int64_t kn = std::min(kWinogradChunk, k - k0);
      float d[2][2][kWinogradChunk], r[4][2][kWinogradChunk];
      for (int a = 0; a < 2; ++a)
        for (int q = 0; q < 2; ++q) {
          if (at[a][q])
            for (int64_t e = 0; e < kn; ++e) d[a][q][e] = load<D>(at[a][q], k0 + e);
          else
            for (int64_t e = 0; e < kn; ++e) d[a][q][e] = 0.0f;
        }
      for (int q = 0; q < 2; ++q)
        for (int64_t e = 0; e < kn; ++e) {
          r[0][q][e] = d[0][q][e];
          r[1][q][e] = d[0][q][e] + d[1][q][e];
          r[2][q][e] = d[0][q][e] - d[1][q][e];
          r[3][q][e] = -d[1][q][e];
        }
      for (int i = 0; i < 4; ++i) {
        S* out[4];
        for (int j = 0; j < 4; ++j) out[j] = dm + ((int64_t)(4 * i + j) * tiles + p) * k + k0;
        for (int64_t e = 0; e < kn; ++e) {
          store<D>(out[0], e, r[i][0][e]);
          store<D>(out[1], e, r[i][0][e] + r[i][1][e]);
          store<D>(out[2], e, r[i][0][e] - r[i][1][e]);
          store<D>(out[3], e, -r[i][1][e]);
        }
      }
    }
  });
}

extern "C" {

// x (N, H, W, C) -> v (16, tiles, C) (winograd_input) in dtype 0 (float32) or 2 (bfloat16); -1 for another.
int sf_winograd_input(const void* x, void* v, int64_t n, int64_t h, int64_t w, int64_t c, int dtype, int nthreads) {
  return with_float_or_bf16(dtype, [&](auto d) {
    using S = typename StorageOf<decltype(d)::value>::type;
    winograd_input<decltype(d)::value>(static_cast<const S*>(x), static_cast<S*>(v), n, h, w, c, nthreads);
  });
}

// m (16, tiles, K) -> y (N, H, W, K) (winograd_output) in dtype 0 (float32) or 2 (bfloat16); -1 for another.
int sf_winograd_output(const void* m, const float* bias, void* y, int64_t n, int64_t h, int64_t w, int64_t k, int dtype,
                       int nthreads) {
  return with_float_or_bf16(dtype, [&](auto d) {
    using S = typename StorageOf<decltype(d)::value>::type;
    winograd_output<decltype(d)::value>(static_cast<const S*>(m), bias, static_cast<S*>(y), n, h, w, k, nthreads);
  });
}

// g (N, H, W, K) -> dm (16, tiles, K) (winograd_grad_tiles) in dtype 0 (float32) or 2 (bfloat16); -1 for another.
int sf_winograd_grad_tiles(const void* g, void* dm, int64_t n, int64_t h, int64_t w, int64_t k, int dtype, int nthreads) {
  return with_float_or_bf16(dtype, [&](auto d) {
    using S = typename StorageOf<decltype(d)::value>::type;
    winograd_grad_tiles<decltype(d)::value>(static_cast<const S*>(g), static_cast<S*>(dm), n, h, w, k, nthreads);
  });
}

}  // extern "C"
#endif  // part 1
