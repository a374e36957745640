// Winograd's F(2x2, 3x3) transforms (kernels/winograd.py): each one pass over channels-last maps,
// OpenMP over 4x4 tiles (stride 2, padding 1), the channels in vector lanes, in the additions'
// order of their PyTorch twins (winograd.input_transform / output_transform), so the same bits.
// The 16 products between them are PyTorch's bmm.
#if SF_IN_PART(1)
namespace {
constexpr int64_t kWinogradChunk = 64;  // channels per inner pass: 16 x 64 floats of a tile in L1
}

extern "C" {

// x (N, H, W, C) -> v (16, tiles, C), tiles = N ceil(H/2) ceil(W/2) in (image, row, column) order:
// V = B^T d B of each tile d, B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
int sf_winograd_input(const float* x, float* v, int64_t n, int64_t h, int64_t w, int64_t c, int nthreads) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = n * th * tw;
  const int nt = tiles >= 64 ? std::max(1, nthreads) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < tiles; ++p) {
    const int64_t b = p / (th * tw), ty = p / tw % th, tx = p % tw;
    const float* at[4][4];
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
            for (int64_t e = 0; e < cn; ++e) d[i][j][e] = at[i][j][c0 + e];
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
        float* out[4];
        for (int j = 0; j < 4; ++j) out[j] = v + ((int64_t)(4 * i + j) * tiles + p) * c + c0;
        for (int64_t e = 0; e < cn; ++e) {
          out[0][e] = t[i][0][e] - t[i][2][e];
          out[1][e] = t[i][1][e] + t[i][2][e];
          out[2][e] = t[i][2][e] - t[i][1][e];
          out[3][e] = t[i][1][e] - t[i][3][e];
        }
      }
    }
  }
  return 0;
}

// m (16, tiles, K) -> y (N, H, W, K): Y = A^T M A of each tile's 16 sums, A^T = [[1, 1, 1, 0],
// [0, 1, -1, -1]], plus bias[k] where bias is not null (added last).
int sf_winograd_output(const float* m, const float* bias, float* y, int64_t n, int64_t h, int64_t w, int64_t k,
                       int nthreads) {
  const int64_t th = (h + 1) / 2, tw = (w + 1) / 2, tiles = n * th * tw;
  const int nt = tiles >= 64 ? std::max(1, nthreads) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t p = 0; p < tiles; ++p) {
    const int64_t b = p / (th * tw), ty = p / tw % th, tx = p % tw;
    for (int64_t k0 = 0; k0 < k; k0 += kWinogradChunk) {
      const int64_t kn = std::min(kWinogradChunk, k - k0);
      const float* in[16];
      for (int q = 0; q < 16; ++q) in[q] = m + ((int64_t)q * tiles + p) * k + k0;
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
        float* row = y + ((b * h + yy) * w + 2 * tx) * k + k0;
        for (int64_t e = 0; e < kn; ++e) row[e] = o[a][0][e];
        if (2 * tx + 1 < w)
          for (int64_t e = 0; e < kn; ++e) row[k + e] = o[a][1][e];
      }
    }
  }
  return 0;
}

}  // extern "C"
#endif  // part 1
