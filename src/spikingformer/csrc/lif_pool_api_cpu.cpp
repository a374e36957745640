// The tokenizer's fused SN -> max-pool (lif_pool_cpu.cpp, which precedes this file in the one
// library source): its instantiations chosen at run time from the arguments, and its extern "C"
// functions. The backward's two forms are parts of the build of their own (SF_IN_PART, lif_cpu.cpp).
namespace {

template <bool POW2, int D>
void forward_affine(const void* x, void* out, const Maps& m, const float* scale, const float* shift, int affine,
                    int pool, const Step& st, int nthreads) {
  switch (affine * 2 + (pool ? 1 : 0)) {
    case 0: pool_forward_impl<POW2, 0, false, D>(x, out, m, scale, shift, st, nthreads); break;
    case 1: pool_forward_impl<POW2, 0, true, D>(x, out, m, scale, shift, st, nthreads); break;
    case 2: pool_forward_impl<POW2, 1, false, D>(x, out, m, scale, shift, st, nthreads); break;
    case 3: pool_forward_impl<POW2, 1, true, D>(x, out, m, scale, shift, st, nthreads); break;
    default:
      if constexpr (kFma) {
        if (pool) pool_forward_impl<POW2, 2, true, D>(x, out, m, scale, shift, st, nthreads);
        else pool_forward_impl<POW2, 2, false, D>(x, out, m, scale, shift, st, nthreads);
      }
  }
}

template <bool POW2>
void forward_pick(const void* x, void* out, const Maps& m, const float* scale, const float* shift, int affine,
                  int pool, int dtype, const Step& st, int nthreads) {
  if (dtype == kBF16) forward_affine<POW2, kBF16>(x, out, m, scale, shift, affine, pool, st, nthreads);
  else forward_affine<POW2, kF32>(x, out, m, scale, shift, affine, pool, st, nthreads);
}

// A BatchNorm's per-channel terms from the kernel's arguments (bn_terms): kind 0 none (mean null),
// 1 x * scale + shift, 2 the same fused (PyTorch's FMA builds).
struct Affine {
  int kind;
  std::vector<float> scale, shift;
  Affine(const float* mean, const float* invstd, const float* weight, const float* bias, int fma, int64_t C)
      : kind(mean == nullptr ? 0 : (fma ? 2 : 1)), scale(C), shift(C) {
    if (kind) bn_terms(mean, invstd, weight, bias, fma, C, scale.data(), shift.data());
  }
};

// The BN's terms and the kernel's output: mean, scale, shift (C each), sums (2 x C or null).
struct BNBackward {
  const float* mean;
  const float* scale;
  const float* shift;
  double* sums;
};

template <bool POW2, bool DETACH, bool POOL, int D>
void backward_affine(const void* z, const void* gout, void* gz, const Maps& m, const BNBackward& bn, int affine,
                     const Step& st, float alpha, int nthreads) {
  if (affine == 0)
    pool_backward_impl<POW2, DETACH, 0, POOL, D>(z, gout, gz, m, bn.mean, bn.scale, bn.shift, st, alpha, bn.sums,
                                                 nthreads);
  else if (affine == 1)
    pool_backward_impl<POW2, DETACH, 1, POOL, D>(z, gout, gz, m, bn.mean, bn.scale, bn.shift, st, alpha, bn.sums,
                                                 nthreads);
  else if constexpr (kFma)
    pool_backward_impl<POW2, DETACH, 2, POOL, D>(z, gout, gz, m, bn.mean, bn.scale, bn.shift, st, alpha, bn.sums,
                                                 nthreads);
}

template <bool POW2, bool DETACH, bool POOL>
void backward_pick_affine(const void* z, const void* gout, void* gz, const Maps& m, const BNBackward& bn, int affine,
                          int dtype, const Step& st, float alpha, int nthreads) {
  if (dtype == kBF16) backward_affine<POW2, DETACH, POOL, kBF16>(z, gout, gz, m, bn, affine, st, alpha, nthreads);
  else backward_affine<POW2, DETACH, POOL, kF32>(z, gout, gz, m, bn, affine, st, alpha, nthreads);
}

template <bool POOL>
void backward_pick(const void* z, const void* gout, void* gz, const Maps& m, const BNBackward& bn, int affine,
                   int dtype, bool pow2, bool detach, const Step& st, float alpha, int nthreads) {
  if (pow2 && detach) backward_pick_affine<true, true, POOL>(z, gout, gz, m, bn, affine, dtype, st, alpha, nthreads);
  else if (pow2) backward_pick_affine<true, false, POOL>(z, gout, gz, m, bn, affine, dtype, st, alpha, nthreads);
  else if (detach) backward_pick_affine<false, true, POOL>(z, gout, gz, m, bn, affine, dtype, st, alpha, nthreads);
  else backward_pick_affine<false, false, POOL>(z, gout, gz, m, bn, affine, dtype, st, alpha, nthreads);
}

}  // namespace

// The backward's two forms, after a max-pool and without one, are each a large share of the
// library's build, so each is a part of its own (2 and 3); sf_lif_pool_backward (part 1) calls them
// with its arguments, checked.
namespace sf_parts {

struct PoolBackwardArgs {
  const void* z;
  const void* gout;
  void* gz;
  int64_t T, B, H, W, C;
  const float* bn_mean;
  const float* bn_invstd;
  const float* bn_weight;
  const float* bn_bias;
  int fma, dtype;
  float tau, vth, vr, alpha;
  int detach;
  double* bn_sums;
  int nthreads;
};

__attribute__((visibility("hidden"))) void pool_backward_pooled(const PoolBackwardArgs& a);
__attribute__((visibility("hidden"))) void pool_backward_unpooled(const PoolBackwardArgs& a);

}  // namespace sf_parts

namespace {

template <bool POOL>
void pool_backward_form(const sf_parts::PoolBackwardArgs& a) {
  const Step st{a.tau, 1.0f / a.tau, a.vth, a.vr};
  const Maps m{a.T, a.B, a.H, a.W, a.C};
  const Affine terms{a.bn_mean, a.bn_invstd, a.bn_weight, a.bn_bias, a.fma, a.C};
  const BNBackward bn{a.bn_mean, terms.scale.data(), terms.shift.data(), a.bn_sums};
  backward_pick<POOL>(a.z, a.gout, a.gz, m, bn, terms.kind, a.dtype, pow2_tau(a.tau), a.detach != 0, st,
                      a.alpha, a.nthreads);
}

}  // namespace

#if SF_IN_PART(2)
void sf_parts::pool_backward_pooled(const PoolBackwardArgs& a) { pool_backward_form<true>(a); }
#endif
#if SF_IN_PART(3)
void sf_parts::pool_backward_unpooled(const PoolBackwardArgs& a) { pool_backward_form<false>(a); }
#endif

#if SF_IN_PART(1)
extern "C" {

// Whether this build computes the BN's fused multiply-adds (else sf_lif_pool_forward refuses fma = 1).
int sf_lif_pool_has_fma() { return kFma ? 1 : 0; }

// x: (T, B, H, W, C), out: the spikes (pooled or not), both of storage dtype dtype (0 float32,
// 2 bfloat16). bn_mean/invstd/weight/bias (float32): a BatchNorm applied first (all null: none),
// with its mean and 1 / sqrt(var + eps) as PyTorch's kernel holds them (running statistics in
// inference, batch statistics in training); fma: whether PyTorch's BN kernel fuses its
// multiply-adds. pool: max-pool the spikes. Returns 0, -1 for a bad shape, -2 for fma = 1 on a
// build without FMA, -3 for another dtype.
int sf_lif_pool_forward(const void* x, void* out, int64_t T, int64_t B, int64_t H, int64_t W, int64_t C,
                        const float* bn_mean, const float* bn_invstd, const float* bn_weight, const float* bn_bias,
                        int fma, int pool, int dtype, float tau, float vth, float vr, int nthreads) {
  if (T < 1 || B < 1 || H < 1 || W < 1 || C < 1) return -1;
  if (dtype != kF32 && dtype != kBF16) return -3;
  if (bn_mean != nullptr && fma && !kFma) return -2;
  const Step st{tau, 1.0f / tau, vth, vr};
  const Maps m{T, B, H, W, C};
  const Affine bn{bn_mean, bn_invstd, bn_weight, bn_bias, fma, C};
  const float *scale = bn.scale.data(), *shift = bn.shift.data();
  if (pow2_tau(tau)) forward_pick<true>(x, out, m, scale, shift, bn.kind, pool, dtype, st, nthreads);
  else forward_pick<false>(x, out, m, scale, shift, bn.kind, pool, dtype, st, nthreads);
  return 0;
}

// z: the LIF input (T, B, H, W, C), or with bn_mean not null the input of a training BatchNorm
// whose batch mean and 1 / sqrt(var + eps) (PyTorch's save_mean, save_invstd), weight and bias are
// given; pool: whether a max-pool followed the spikes; gout: gradient of the pooled spikes
// (T, B, Ho, Wo, C), or without the pool of the spikes (T, B, H, W, C); gz: the gradient with
// respect to the LIF input (BN's output), (T, B, H, W, C). z, gout and gz have storage dtype dtype.
// bn_sums (2 x C float64, with bn_mean; may be null): BN's backward reductions of gz as stored, per
// channel: sum gz, then sum gz (z - mean). Returns as sf_lif_pool_forward.
int sf_lif_pool_backward(const void* z, const void* gout, void* gz, int64_t T, int64_t B, int64_t H, int64_t W,
                         int64_t C, const float* bn_mean, const float* bn_invstd, const float* bn_weight,
                         const float* bn_bias, int fma, int pool, int dtype, float tau, float vth, float vr,
                         float alpha, int detach, double* bn_sums, int nthreads) {
  if (T < 1 || B < 1 || H < 1 || W < 1 || C < 1) return -1;
  if (dtype != kF32 && dtype != kBF16) return -3;
  if (bn_mean != nullptr && fma && !kFma) return -2;
  const sf_parts::PoolBackwardArgs args{z, gout, gz, T, B, H, W, C, bn_mean, bn_invstd, bn_weight, bn_bias, fma,
                                        dtype, tau, vth, vr, alpha, detach, bn_sums, nthreads};
  if (pool) sf_parts::pool_backward_pooled(args);
  else sf_parts::pool_backward_unpooled(args);
  return 0;
}

}  // extern "C"
#endif  // part 1
