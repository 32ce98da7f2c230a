// The BPTT of a multi-step LIF neuron (SpikingJelly's MultiStepLIFNode, detach_reset, sigmoid surrogate)
// in one pass over memory, for XLA:CPU through the XLA FFI.
//
//   LifBackward  grad_x[T, M] from the input current x[T, M] and the spikes' cotangent g[T, M]
//
// Per element, the forward pass is recomputed into a [T] margin buffer, then run backwards (the equations
// of spikingformer_jax/neurons.py):
//   H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau   (decay_input; else V[t-1] - (V[t-1] - V_reset) / tau + X[t])
//   S[t] = H[t] - V_th >= 0,  V[t] = hard reset ? (S[t] ? V_reset : H[t]) : H[t] - V_th S[t]
//   grad_H[t] = g[t] sg'(H[t] - V_th) + grad_V[t] (hard reset ? 1 - S[t] : 1),  grad_V[t-1] = grad_H[t] (1 - 1/tau)
//   grad_X[t] = grad_H[t] / tau (decay_input; else grad_H[t]),  sg'(m) = alpha sigmoid(alpha m) (1 - sigmoid(alpha m))
// XLA splits the unrolled scan into one fusion per time step and materialises each step's membrane; here
// each element's T margins stay in a block buffer in cache. Elements are split over XLA's thread pool in
// blocks; the sigmoid's exp is a vectorised polynomial (Cephes expf, ~1 ulp) on AVX-512, std::exp elsewhere.
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 512;  // elements per task; T * kBlock margins stay in L1/L2

struct Lif {
  float decay, v_threshold, v_reset;
  bool hard_reset, decay_input;
  float alpha;
};

#if defined(__AVX512F__)
__m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, k);
}
#endif

// out[i] = sg'(m[i]) for i < n.
void SigmoidGrad(const float* m, float* out, int64_t n, float alpha) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 a = _mm512_set1_ps(alpha), one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = Exp(_mm512_mul_ps(_mm512_set1_ps(-alpha), _mm512_loadu_ps(m + i)));
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(a, s), _mm512_sub_ps(one, s)));
  }
#endif
  for (; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-alpha * m[i]));
    out[i] = alpha * s * (1.0f - s);
  }
}

void Block(const Lif& c, int64_t T, int64_t M, int64_t start, int64_t n, const float* x, const float* g, float* out,
           std::vector<float>& margin, std::vector<float>& state) {
  float* v = state.data();
  float* grad_v = state.data() + kBlock;
  float* sg = state.data() + 2 * kBlock;
  const float rest = c.hard_reset ? c.v_reset : 0.0f;
  for (int64_t j = 0; j < n; ++j) v[j] = rest;
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * M + start;
    float* mt = margin.data() + t * kBlock;
    for (int64_t j = 0; j < n; ++j) {
      const float h = c.decay_input ? v[j] + (xt[j] - (v[j] - rest)) * c.decay : v[j] - (v[j] - rest) * c.decay + xt[j];
      const float m = h - c.v_threshold;
      const bool s = m >= 0.0f;
      mt[j] = m;
      v[j] = c.hard_reset ? (s ? c.v_reset : h) : (s ? h - c.v_threshold : h);
    }
  }
  for (int64_t j = 0; j < n; ++j) grad_v[j] = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* mt = margin.data() + t * kBlock;
    const float* gt = g + t * M + start;
    float* ot = out + t * M + start;
    SigmoidGrad(mt, sg, n, c.alpha);
    for (int64_t j = 0; j < n; ++j) {
      const float through = c.hard_reset && mt[j] >= 0.0f ? 0.0f : grad_v[j];
      const float grad_h = gt[j] * sg[j] + through;
      grad_v[j] = grad_h * (1.0f - c.decay);
      ot[j] = c.decay_input ? grad_h * c.decay : grad_h;
    }
  }
}

ffi::Error LifBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, float decay, float v_threshold, float v_reset,
                           bool hard_reset, bool decay_input, float alpha) {
  const auto dims = x.dimensions();
  if (dims.size() < 1 || g.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("LifBackward: x and g must both be [T, ...] of one shape");
  const int64_t T = dims[0];
  const int64_t M = T ? static_cast<int64_t>(x.element_count()) / T : 0;
  const Lif c{decay, v_threshold, v_reset, hard_reset, decay_input, alpha};
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* op = out->typed_data();
  spikingformer_kernels::ParallelFor(pool, (M + kBlock - 1) / kBlock, [&](int64_t b) {
    thread_local std::vector<float> margin, state;
    margin.resize(T * kBlock);
    state.resize(3 * kBlock);
    const int64_t start = b * kBlock;
    Block(c, T, M, start, std::min(kBlock, M - start), xp, gp, op, margin, state);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LifBackward, LifBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("decay")
                                  .Attr<float>("v_threshold")
                                  .Attr<float>("v_reset")
                                  .Attr<bool>("hard_reset")
                                  .Attr<bool>("decay_input")
                                  .Attr<float>("alpha"));
