// Products whose left operand is a spike tensor (mostly zeros), for XLA:CPU through the XLA FFI.
//
// A dense GEMM multiplies every zero spike; these kernels compress each row of the spike operand to
// the list of its non-zero entries and accumulate only the matching weight (or gradient) rows, so the
// work scales with the spike density (0.03-0.26 in Spikingformer). Each entry is multiplied by its
// value, so the products are right for any operand, binary or not; the sums run in the order of the
// non-zero entries, so results differ from a GEMM's only by float rounding. The spike operand `a` is float32,
// or int8 when it holds spikes or small integer counts: a quarter of the bytes for the step to write and the
// kernels to read.
//
//   SpikeMatmul   out[M, N] = a[M, K] @ w[K, N]
//   SpikeMatmulT  out[K, N] = a[M, K]^T @ g[M, N]                    (the weight gradient)
//   SpikeConv3x3  out[B, H, W, O] = the 3x3 stride-1 convolution of a, zero-padded to [B, H+2, W+2, C],
//                 with w [3, 3, C, O] (XLA's NHWC / HWIO layout)
//   SpikeConv3x3WGrad  out[3, 3, C, O] = that convolution's kernel gradient, for the output gradient
//                 g zero-padded to [B, H+2, W+2, O]
//
// Work is split over XLA's intra-op thread pool. Output columns are processed in tiles of kTile floats
// that stay in vector registers (AVX-512, or AVX2 + FMA in two halves) while the selected rows are
// accumulated; other CPUs get portable loops, which the compiler vectorises with the tile in memory.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

using spikingformer_kernels::ParallelFor;

// Output columns per tile: AVX-512 holds 256 floats in 16 of its 32 registers; AVX2 takes 128 in two parts of 64.
#if defined(__AVX512F__)
constexpr int64_t kTile = 256;
#else
constexpr int64_t kTile = 128;
#endif
using Matrix = ffi::Buffer<ffi::F32, 2>;
using Image = ffi::Buffer<ffi::F32, 4>;  // [B, H, W, C]

// Entry positions are stored as int32.
bool Indexable(int64_t rows, int64_t cols) {
  return rows <= std::numeric_limits<int32_t>::max() && cols <= std::numeric_limits<int32_t>::max();
}

ffi::Error TooLarge(const char* kernel) {
  return ffi::Error::InvalidArgument(std::string(kernel) + ": more than 2^31 - 1 rows or columns");
}

// One contiguous list of selected rows: row `idx[i] + offset` of `base` scaled by `val[i]`.
struct Segment {
  const int32_t* idx;
  const float* val;
  int64_t n;
  int64_t offset;
};

// The vector operations of the widest instruction set the build has: kLanes floats per register, plain
// and masked loads and stores (a mask keeps the first n lanes), fused multiply-add.
#if defined(__AVX512F__)
#define SPIKE_KERNELS_VECTORIZED 2
struct Isa {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kAccumulators = 16;  // of the 32 vector registers
  static Mask First(int n) { return static_cast<Mask>(n >= 16 ? 0xFFFFu : (1u << n) - 1u); }
  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec Splat(float x) { return _mm512_set1_ps(x); }
  static Vec Load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec Load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void Store(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define SPIKE_KERNELS_VECTORIZED 1
struct Isa {
  using Vec = __m256;
  using Mask = __m256i;  // lanes set to -1 are kept
  static constexpr int kLanes = 8;
  static constexpr int kAccumulators = 8;  // of the 16 vector registers
  static Mask First(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec Splat(float x) { return _mm256_set1_ps(x); }
  static Vec Load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec Load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void Store(float* p, Mask m, Vec v) { _mm256_maskstore_ps(p, m, v); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
};
#else
#define SPIKE_KERNELS_VECTORIZED 0
#endif

#if SPIKE_KERNELS_VECTORIZED
// AccumulateTile for NV vectors, the last one masked by `last`; the accumulators stay in registers.
template <int NV>
void AccumulateVectors(float* __restrict out, const float* __restrict base, int64_t stride,
                       const Segment* segs, int n_segs, Isa::Mask last, bool accumulate) {
  constexpr int L = Isa::kLanes;
  Isa::Vec acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v)
    acc[v] = !accumulate ? Isa::Zero() : v < NV - 1 ? Isa::Load(out + L * v) : Isa::Load(out + L * v, last);
  for (int s = 0; s < n_segs; ++s) {
    const Segment& g = segs[s];
    for (int64_t i = 0; i < g.n; ++i) {
      const float* p = base + (g.idx[i] + g.offset) * stride;
      const Isa::Vec x = Isa::Splat(g.val[i]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v)
        acc[v] = Isa::Fma(x, v < NV - 1 ? Isa::Load(p + L * v) : Isa::Load(p + L * v, last), acc[v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV - 1; ++v) Isa::Store(out + L * v, acc[v]);
  Isa::Store(out + L * (NV - 1), last, acc[NV - 1]);
}

// AccumulateVectors<1> ... AccumulateVectors<Isa::kAccumulators>, indexed by the vector count - 1.
using AccumulateVectorsFn = void (*)(float*, const float*, int64_t, const Segment*, int, Isa::Mask, bool);
template <int... V>
constexpr std::array<AccumulateVectorsFn, sizeof...(V)> AccumulateVectorsByCount(std::integer_sequence<int, V...>) {
  return {&AccumulateVectors<V + 1>...};
}
constexpr auto kAccumulateVectors = AccumulateVectorsByCount(std::make_integer_sequence<int, Isa::kAccumulators>());
#endif

// out[0:width] (+)= sum over segments s, entries i of s.val[i] * base[(s.idx[i] + s.offset) * stride + 0:width]
// for width <= kTile; `accumulate` adds to out's values instead of overwriting them.
void AccumulateTile(float* __restrict out, const float* __restrict base, int64_t stride,
                    const Segment* segs, int n_segs, int64_t width, bool accumulate = false) {
#if SPIKE_KERNELS_VECTORIZED
  constexpr int64_t kPart = Isa::kAccumulators * Isa::kLanes;
  for (int64_t j0 = 0; j0 < width; j0 += kPart) {
    const int64_t part = std::min(kPart, width - j0);
    const int nv = static_cast<int>((part + Isa::kLanes - 1) / Isa::kLanes);
    const Isa::Mask last = Isa::First(static_cast<int>(part - Isa::kLanes * (nv - 1)));
    float* o = out + j0;
    const float* b = base + j0;
    kAccumulateVectors[nv - 1](o, b, stride, segs, n_segs, last, accumulate);
  }
#else
  float acc[kTile] = {0.0f};
  if (accumulate) std::copy_n(out, width, acc);
  for (int s = 0; s < n_segs; ++s) {
    const Segment& g = segs[s];
    for (int64_t i = 0; i < g.n; ++i) {
      const float* p = base + (g.idx[i] + g.offset) * stride;
      const float v = g.val[i];
      for (int64_t j = 0; j < width; ++j) acc[j] += v * p[j];
    }
  }
  std::copy_n(acc, width, out);
#endif
}

#if defined(__AVX512F__)
// Writes the lanes of x that `nz` selects, and their positions j + lane, to idx and val; returns how many.
int StoreSelectedLanes(__mmask16 nz, int64_t j, __m512 x, int32_t* __restrict idx, float* __restrict val) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Compress in registers, then a masked store of the first popcount lanes (compressing straight to
  // memory is slow on some CPUs; the mask keeps the entries after them intact).
  const int m = __builtin_popcount(nz);
  const __mmask16 first = static_cast<__mmask16>((1u << m) - 1u);
  _mm512_mask_storeu_epi32(idx, first, _mm512_maskz_compress_epi32(nz, _mm512_add_epi32(lane, _mm512_set1_epi32(j))));
  _mm512_mask_storeu_ps(val, first, _mm512_maskz_compress_ps(nz, x));
  return m;
}
#endif

// Writes the positions and values of the non-zero entries of row[0:n] and returns how many there are.
int64_t CompressRow(const float* __restrict row, int64_t n, int32_t* __restrict idx, float* __restrict val) {
  int64_t count = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    const __m512 x = _mm512_loadu_ps(row + j);
    const __mmask16 nz = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    if (nz) count += StoreSelectedLanes(nz, j, x, idx + count, val + count);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 <= n; j += 8) {
    for (unsigned nz = static_cast<unsigned>(_mm256_movemask_ps(
             _mm256_cmp_ps(_mm256_loadu_ps(row + j), _mm256_setzero_ps(), _CMP_NEQ_UQ)));
         nz; nz &= nz - 1) {
      const int64_t at = j + __builtin_ctz(nz);
      idx[count] = static_cast<int32_t>(at);
      val[count] = row[at];
      ++count;
    }
  }
#endif
  for (; j < n; ++j) {
    if (row[j] != 0.0f) {
      idx[count] = static_cast<int32_t>(j);
      val[count] = row[j];
      ++count;
    }
  }
  return count;
}

// CompressRow for a row of small integers (int8), whose values are written as floats.
int64_t CompressRow(const int8_t* __restrict row, int64_t n, int32_t* __restrict idx, float* __restrict val) {
  int64_t count = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16) {
    const __m512i x = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
    const __mmask16 nz = _mm512_test_epi32_mask(x, x);
    if (nz) count += StoreSelectedLanes(nz, j, _mm512_cvtepi32_ps(x), idx + count, val + count);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  for (; j + 32 <= n; j += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
    for (unsigned nz = ~static_cast<unsigned>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, _mm256_setzero_si256())));
         nz; nz &= nz - 1) {
      const int64_t at = j + __builtin_ctz(nz);
      idx[count] = static_cast<int32_t>(at);
      val[count] = static_cast<float>(row[at]);
      ++count;
    }
  }
#endif
  for (; j < n; ++j) {
    if (row[j] != 0) {
      idx[count] = static_cast<int32_t>(j);
      val[count] = static_cast<float>(row[j]);
      ++count;
    }
  }
  return count;
}

// The rows of a [rows, cols] matrix compressed to their non-zero entries in one parallel pass over it. Chunk k
// of kRowsPerChunk rows writes its entries from position k * kRowsPerChunk * cols of one uninitialised
// [rows * cols] array, so no chunk waits for another's count; only the pages the entries fill are touched.
class ChunkedRows {
 public:
  static constexpr int64_t kRowsPerChunk = 256;

  template <typename T>  // float or int8_t
  ChunkedRows(ffi::ThreadPool& pool, const T* a, int64_t rows, int64_t cols)
      : rows_(rows), idx_(new int32_t[rows * cols]), val_(new float[rows * cols]), begin_(rows), count_(rows) {
    ParallelFor(pool, (rows + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t k) {
      const int64_t r0 = k * kRowsPerChunk, r1 = std::min(rows, r0 + kRowsPerChunk);
      int64_t at = r0 * cols;
      for (int64_t r = r0; r < r1; ++r) {
        begin_[r] = at;
        count_[r] = CompressRow(a + r * cols, cols, idx_.get() + at, val_.get() + at);
        at += count_[r];
      }
    });
  }

  int64_t rows() const { return rows_; }
  // Row r's entries as a segment whose positions are shifted by `offset`.
  Segment Row(int64_t r, int64_t offset) const {
    return Segment{idx_.get() + begin_[r], val_.get() + begin_[r], count_[r], offset};
  }

 private:
  int64_t rows_;
  std::unique_ptr<int32_t[]> idx_;
  std::unique_ptr<float[]> val_;
  std::vector<int64_t> begin_, count_;
};

// `a` ([rows, cols]: float32, or int8 for spikes and small integer counts) compressed; nullopt for any other type.
std::optional<ChunkedRows> Compress(ffi::ThreadPool& pool, const ffi::AnyBuffer& a, int64_t rows, int64_t cols) {
  switch (a.element_type()) {
    case ffi::DataType::F32: return ChunkedRows(pool, a.typed_data<float>(), rows, cols);
    case ffi::DataType::S8: return ChunkedRows(pool, a.typed_data<int8_t>(), rows, cols);
    default: return std::nullopt;
  }
}

ffi::Error NotSpikes(const char* kernel) {
  return ffi::Error::InvalidArgument(std::string(kernel) + ": the spike operand must be float32 or int8");
}

// A matrix's columns as lists of (row, value) entries in increasing row order (compressed sparse columns).
struct CompressedColumns {
  std::vector<int64_t> start;  // cols + 1
  std::vector<int32_t> idx;
  std::vector<float> val;
};

CompressedColumns Transpose(const ChunkedRows& r, int64_t cols) {
  CompressedColumns t;
  t.start.assign(cols + 1, 0);
  for (int64_t row = 0; row < r.rows(); ++row) {
    const Segment s = r.Row(row, 0);
    for (int64_t i = 0; i < s.n; ++i) ++t.start[s.idx[i] + 1];
  }
  for (int64_t j = 0; j < cols; ++j) t.start[j + 1] += t.start[j];
  t.idx.resize(t.start[cols]);
  t.val.resize(t.start[cols]);
  std::vector<int64_t> fill(t.start.begin(), t.start.end() - 1);
  for (int64_t row = 0; row < r.rows(); ++row) {
    const Segment s = r.Row(row, 0);
    for (int64_t i = 0; i < s.n; ++i) {
      const int64_t at = fill[s.idx[i]]++;
      t.idx[at] = static_cast<int32_t>(row);
      t.val[at] = s.val[i];
    }
  }
  return t;
}

ffi::Error SpikeMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, Matrix w,
                           ffi::Result<Matrix> out) {
  if (a.dimensions().size() != 2) return ffi::Error::InvalidArgument("SpikeMatmul: a must be [M, K]");
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1], n = w.dimensions()[1];
  if (w.dimensions()[0] != k) return ffi::Error::InvalidArgument("SpikeMatmul: a is [M, K], w must be [K, N]");
  if (!Indexable(m, k)) return TooLarge("SpikeMatmul");
  const std::optional<ChunkedRows> compressed = Compress(pool, a, m, k);
  if (!compressed) return NotSpikes("SpikeMatmul");
  const ChunkedRows& rows = *compressed;
  constexpr int64_t kRowsPerChunk = 128;  // rows that share each [K, kTile] tile of w while it is in cache
  const float* wd = w.typed_data();
  float* y = out->typed_data();
  ParallelFor(pool, (m + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    const int64_t r0 = chunk * kRowsPerChunk, r1 = std::min(m, r0 + kRowsPerChunk);
    for (int64_t n0 = 0; n0 < n; n0 += kTile) {
      for (int64_t r = r0; r < r1; ++r) {
        const Segment seg = rows.Row(r, 0);
        AccumulateTile(y + r * n + n0, wd + n0, n, &seg, 1, std::min(kTile, n - n0));
      }
    }
  });
  return ffi::Error::Success();
}

// out[t][c, :] = sum over the entries (r, v) of column c of `cols` of v * g[r + offsets[t], :], for each
// offset t, with out[t] = out + t * out_stride. Each chunk owns a range of columns c. For every tile of
// output columns it walks the rows r in blocks of kRowBlock, so the rows of g that a block reaches stay
// in cache while every column of the chunk takes its entries from them; `cursor` remembers where each
// column's (sorted) row list left off.
void TransposedProduct(ffi::ThreadPool& pool, const CompressedColumns& cols, int64_t rows, int64_t k,
                       const float* g, int64_t n, const std::vector<int64_t>& offsets, float* out,
                       int64_t out_stride) {
  constexpr int64_t kRowBlock = 512;
  const int64_t chunks = std::min<int64_t>(k, 2 * std::max<int64_t>(pool.num_threads(), 1));
  const int64_t per_chunk = (k + chunks - 1) / chunks;
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    const int64_t c0 = chunk * per_chunk, c1 = std::min(k, c0 + per_chunk);
    std::vector<int64_t> cursor(std::max<int64_t>(c1 - c0, 0));
    for (int64_t n0 = 0; n0 < n; n0 += kTile) {
      const int64_t width = std::min(kTile, n - n0);
      for (int64_t c = c0; c < c1; ++c) cursor[c - c0] = cols.start[c];
      for (int64_t r0 = 0; r0 == 0 || r0 < rows; r0 += kRowBlock) {  // once at least: writes zeros if rows = 0
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t begin = cursor[c - c0];
          int64_t end = begin;
          while (end < cols.start[c + 1] && cols.idx[end] < r0 + kRowBlock) ++end;
          for (size_t t = 0; t < offsets.size(); ++t) {
            const Segment seg{cols.idx.data() + begin, cols.val.data() + begin, end - begin, offsets[t]};
            AccumulateTile(out + t * out_stride + c * n + n0, g + n0, n, &seg, 1, width, r0 > 0);
          }
          cursor[c - c0] = end;
        }
      }
    }
  });
}

ffi::Error SpikeMatmulTImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, Matrix g, ffi::Result<Matrix> out) {
  if (a.dimensions().size() != 2) return ffi::Error::InvalidArgument("SpikeMatmulT: a must be [M, K]");
  const int64_t m = a.dimensions()[0], k = a.dimensions()[1], n = g.dimensions()[1];
  if (g.dimensions()[0] != m) return ffi::Error::InvalidArgument("SpikeMatmulT: a is [M, K], g must be [M, N]");
  if (!Indexable(m, k)) return TooLarge("SpikeMatmulT");
  const std::optional<ChunkedRows> compressed = Compress(pool, a, m, k);
  if (!compressed) return NotSpikes("SpikeMatmulT");
  const CompressedColumns cols = Transpose(*compressed, k);
  TransposedProduct(pool, cols, m, k, g.typed_data(), n, {0}, out->typed_data(), 0);
  return ffi::Error::Success();
}

// a: [B, H+2, W+2, C] zero-padded spikes; w: [3, 3, C, O]; out: [B, H, W, O].
ffi::Error SpikeConv3x3Impl(ffi::ThreadPool pool, ffi::AnyBuffer a, Image w,
                            ffi::Result<Image> out) {
  if (a.dimensions().size() != 4) return ffi::Error::InvalidArgument("SpikeConv3x3: a must be [B, H+2, W+2, C]");
  const int64_t b = a.dimensions()[0], hp = a.dimensions()[1], wp = a.dimensions()[2], c = a.dimensions()[3];
  const int64_t o = w.dimensions()[3], h = hp - 2, wd = wp - 2;
  if (w.dimensions()[0] != 3 || w.dimensions()[1] != 3 || w.dimensions()[2] != c)
    return ffi::Error::InvalidArgument("SpikeConv3x3: w must be [3, 3, C, O] with C = a's last dimension");
  if (!Indexable(b * hp * wp, c)) return TooLarge("SpikeConv3x3");
  const std::optional<ChunkedRows> compressed = Compress(pool, a, b * hp * wp, c);
  if (!compressed) return NotSpikes("SpikeConv3x3");
  const ChunkedRows& pix = *compressed;
  const float* wdata = w.typed_data();
  float* y = out->typed_data();
  // Weight row (tap * C + channel): a pixel's channel list indexes rows with offset tap * C.
  // One image per chunk, so each [9C, kTile] tile of w serves all of the image's pixels while in cache.
  ParallelFor(pool, b, [&](int64_t bi) {
    Segment segs[9];
    for (int64_t n0 = 0; n0 < o; n0 += kTile) {
      for (int64_t yi = 0; yi < h; ++yi) {
        for (int64_t xi = 0; xi < wd; ++xi) {
          int s = 0;
          for (int64_t dy = 0; dy < 3; ++dy)
            for (int64_t dx = 0; dx < 3; ++dx)
              segs[s++] = pix.Row((bi * hp + yi + dy) * wp + xi + dx, (dy * 3 + dx) * c);
          AccumulateTile(y + ((bi * h + yi) * wd + xi) * o + n0, wdata + n0, o, segs, 9, std::min(kTile, o - n0));
        }
      }
    }
  });
  return ffi::Error::Success();
}

// a: [B, H+2, W+2, C] zero-padded spikes; g: [B, H+2, W+2, O] the zero-padded output gradient;
// out[dy, dx, c, :] = sum over output pixels p of a[p + (dy, dx), c] * g[p, :] (p in unpadded coordinates).
// With q = p + (dy, dx) the padded pixel where channel c spikes, p sits at padded flat index
// q + (1 - dy) * (W + 2) + (1 - dx): a row offset per tap on the transposed product, which never leaves
// the padded frame because spikes only lie inside it (outside the image, g's padding is zero).
ffi::Error SpikeConv3x3WGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, Image g, ffi::Result<Image> out) {
  if (a.dimensions().size() != 4) return ffi::Error::InvalidArgument("SpikeConv3x3WGrad: a must be [B, H+2, W+2, C]");
  const int64_t b = a.dimensions()[0], hp = a.dimensions()[1], wp = a.dimensions()[2], c = a.dimensions()[3];
  const int64_t o = g.dimensions()[3];
  if (g.dimensions()[0] != b || g.dimensions()[1] != hp || g.dimensions()[2] != wp)
    return ffi::Error::InvalidArgument("SpikeConv3x3WGrad: g must be zero-padded like a: [B, H+2, W+2, O]");
  const int64_t pixels = b * hp * wp;
  if (!Indexable(pixels, c)) return TooLarge("SpikeConv3x3WGrad");
  const std::optional<ChunkedRows> compressed = Compress(pool, a, pixels, c);
  if (!compressed) return NotSpikes("SpikeConv3x3WGrad");
  const CompressedColumns chan = Transpose(*compressed, c);
  std::vector<int64_t> offsets;
  for (int64_t dy = 0; dy < 3; ++dy)
    for (int64_t dx = 0; dx < 3; ++dx) offsets.push_back((1 - dy) * wp + (1 - dx));
  TransposedProduct(pool, chan, pixels, c, g.typed_data(), o, offsets, out->typed_data(), c * o);
  return ffi::Error::Success();
}

// Every kernel: XLA's intra-op thread pool, the spike operand (float32 or int8), a float32 operand, a float32 result.
template <typename Buffer>
auto BindTwoToOne() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().template Arg<Buffer>().template Ret<Buffer>();
}

}  // namespace

// Which vector paths this build has: 2 AVX-512, 1 AVX2 + FMA, 0 only the portable loops.
extern "C" int SpikeKernelsVectorized() { return SPIKE_KERNELS_VECTORIZED; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeMatmul, SpikeMatmulImpl, BindTwoToOne<Matrix>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeMatmulT, SpikeMatmulTImpl, BindTwoToOne<Matrix>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeConv3x3, SpikeConv3x3Impl, BindTwoToOne<Image>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SpikeConv3x3WGrad, SpikeConv3x3WGradImpl, BindTwoToOne<Image>());
