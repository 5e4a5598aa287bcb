// CUDA kernels of the GPU decode path (lm::cuda). Compiled to PTX by lm/build.rs when the
// `cuda` feature is on; the driver JIT-compiles the PTX at load time.
//
// Why our own kernels: with candle ops a decoder layer is ~25 launches; these fuse the steps
// around the matmuls so a layer is 8 launches, and they read per-row positions and cache
// addresses from device memory, so one captured CUDA graph serves every step of a batch size.
//
// Layouts (bf16 unless noted):
//   activations   [rows, width], row-major, contiguous
//   a row's cache one buffer per sequence: [layers][2 (k, v)][kv_heads][cap][head_dim]
//   kv_base       [rows] u64: the address of each row's sequence cache
//   pos           [rows] i32: the position each row is written at (it sees keys 0..=pos)

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Block-wide sum (or max); `scratch` holds 32 floats. Every thread gets the result.
template <bool MAX>
__device__ float block_reduce(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : (MAX ? -INFINITY : 0.f);
    return MAX ? warp_max(v) : warp_sum(v);
}

__device__ float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
__device__ float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }

__device__ __forceinline__ bf16 rnd(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ float f(bf16 x) { return __bfloat162float(x); }

// resid += delta (when delta is not null), then out = weight * rmsnorm(resid), rounding to
// bf16 where HF's LlamaRMSNorm does. One block per row.
extern "C" __global__ void add_rms_norm(const bf16* __restrict__ delta, bf16* __restrict__ resid,
                                        const bf16* __restrict__ weight, bf16* __restrict__ out,
                                        int width, float eps) {
    __shared__ float scratch[32];
    bf16* x = resid + (size_t)blockIdx.x * width;
    const bf16* d = delta ? delta + (size_t)blockIdx.x * width : nullptr;
    bf16* y = out + (size_t)blockIdx.x * width;
    float ss = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = f(x[i]);
        if (d) {
            v = f(rnd(v + f(d[i])));
            x[i] = rnd(v);
        }
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss, scratch) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        y[i] = rnd(f(weight[i]) * f(rnd(f(x[i]) * r)));
}

// Adds the q/k/v bias (optional), applies rotary embeddings to q and k at each row's position,
// writes q to q_out [rows, heads, d] and k, v into the row's cache at that position.
// Grid (rows, heads + 2*kv_heads); block d/2 threads (each owns a rotation pair).
extern "C" __global__ void rope_kv_append(const bf16* __restrict__ qkv, const bf16* __restrict__ bias,
                                          const int* __restrict__ pos,
                                          const unsigned long long* __restrict__ kv_base,
                                          bf16* __restrict__ q_out, int layer, int heads,
                                          int kv_heads, int d, int cap, float theta,
                                          int interleaved) {
    int row = blockIdx.x, h = blockIdx.y, i = threadIdx.x, half = d / 2;
    int width = (heads + 2 * kv_heads) * d;
    const bf16* src = qkv + (size_t)row * width + (size_t)h * d;
    const bf16* b = bias ? bias + (size_t)h * d : nullptr;
    int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    float a = f(src[ia]), c = f(src[ib]);
    if (b) {
        a = f(rnd(a + f(b[ia])));
        c = f(rnd(c + f(b[ib])));
    }
    int p = pos[row];
    bool is_v = h >= heads + kv_heads;
    if (!is_v) {
        float inv = 1.f / powf(theta, (float)(2 * i) / (float)d);
        float s, co;
        sincosf((float)p * inv, &s, &co);
        float cb = f(rnd(co)), sb = f(rnd(s));
        float na = f(rnd(f(rnd(a * cb)) - f(rnd(c * sb))));
        float nc = f(rnd(f(rnd(c * cb)) + f(rnd(a * sb))));
        a = na;
        c = nc;
    }
    bf16* dst;
    if (h < heads) {
        dst = q_out + ((size_t)row * heads + h) * d;
    } else {
        int kv = is_v ? 1 : 0;
        int kh = is_v ? h - heads - kv_heads : h - heads;
        bf16* base = (bf16*)kv_base[row];
        dst = base + ((((size_t)layer * 2 + kv) * kv_heads + kh) * cap + p) * d;
    }
    dst[ia] = rnd(a);
    dst[ib] = rnd(c);
}

// Attention of one query row over its sequence's keys 0..=pos. Grid (rows, heads); block of
// `blockDim.x` threads (a multiple of 32, >= d); dynamic shared memory: (pos_max+1) floats for
// the scores plus d floats for the query. Query heads share kv heads in groups (GQA).
extern "C" __global__ void decode_attention(const bf16* __restrict__ q, const int* __restrict__ pos,
                                            const unsigned long long* __restrict__ kv_base,
                                            bf16* __restrict__ out, int layer, int heads,
                                            int kv_heads, int d, int cap, float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    int row = blockIdx.x, h = blockIdx.y, kh = h / (heads / kv_heads);
    int len = pos[row] + 1;
    float* qs = smem;
    float* s = smem + d;
    const bf16* qr = q + ((size_t)row * heads + h) * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = f(qr[i]);
    __syncthreads();
    const bf16* base = (const bf16*)kv_base[row];
    const bf16* K = base + (((size_t)layer * 2 + 0) * kv_heads + kh) * cap * d;
    const bf16* V = base + (((size_t)layer * 2 + 1) * kv_heads + kh) * cap * d;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float mx = -INFINITY;
    for (int j = warp; j < len; j += warps) {
        const bf16* k = K + (size_t)j * d;
        float dot = 0.f;
        for (int i = lane; i < d; i += 32) dot += qs[i] * f(k[i]);
        dot = warp_sum(dot) * scale;
        if (lane == 0) s[j] = dot;
        mx = fmaxf(mx, dot);
    }
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = __expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    __syncthreads();
    float inv = 1.f / sum;
    bf16* o = out + (size_t)row * heads * d + (size_t)h * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < len; ++j) acc += s[j] * f(V[(size_t)j * d + i]);
        o[i] = rnd(acc * inv);
    }
}

// out = silu(gate) * up, where gu = [rows, 2*ffn] holds gate then up (one fused matmul).
extern "C" __global__ void silu_mul(const bf16* __restrict__ gu, bf16* __restrict__ out, int ffn,
                                    int total) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int row = idx / ffn, i = idx % ffn;
    float g = f(gu[(size_t)row * 2 * ffn + i]);
    float u = f(gu[(size_t)row * 2 * ffn + ffn + i]);
    float sg = f(rnd(g / (1.f + __expf(-g))));
    out[idx] = rnd(sg * u);
}

// Per row of f32 logits, at temperature scale `inv_t` (z = l * inv_t): log Z, the entropy of
// softmax(z), and KL(p || p_prev) against the previous step's log-probabilities `prev_logp`
// (when not null). Writes this step's log-probabilities to `logp` for the next step.
// One block per row. stats[row] = {log Z, entropy, kl}.
extern "C" __global__ void softmax_stats(const float* __restrict__ logits, int n, float inv_t,
                                         const float* __restrict__ prev_logp,
                                         float* __restrict__ logp, float* __restrict__ stats) {
    __shared__ float scratch[32];
    const float* l = logits + (size_t)blockIdx.x * n;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, l[i] * inv_t);
    mx = block_max(mx, scratch);
    float sum = 0.f, ez = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float z = l[i] * inv_t;
        float e = __expf(z - mx);
        sum += e;
        ez += e * (z - mx);
    }
    sum = block_sum(sum, scratch);
    ez = block_sum(ez, scratch);
    float lse = mx + logf(sum);
    float entropy = fmaxf(logf(sum) - ez / sum, 0.f);
    float kl = 0.f;
    float* lp = logp ? logp + (size_t)blockIdx.x * n : nullptr;
    const float* q = prev_logp ? prev_logp + (size_t)blockIdx.x * n : nullptr;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = l[i] * inv_t - lse;
        if (q) kl += __expf(v) * (v - q[i]);
        if (lp) lp[i] = v;
    }
    if (q) kl = block_sum(kl, scratch);
    if (threadIdx.x == 0) {
        stats[blockIdx.x * 3 + 0] = lse;
        stats[blockIdx.x * 3 + 1] = entropy;
        stats[blockIdx.x * 3 + 2] = fmaxf(kl, 0.f);
    }
}

// Order-preserving map of a float to an unsigned key (larger float -> larger key).
__device__ __forceinline__ unsigned key_of(float x) {
    unsigned u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exact top-k (k <= 1024) of each row of f32 values by radix select: four 8-bit histogram passes
// find the k-th largest key, one pass gathers the winners, a bitonic sort orders them by value
// (descending), ties by index (ascending), so the result is deterministic.
// One block of 1024 threads per row. out_val/out_idx: [rows, k].
extern "C" __global__ void topk(const float* __restrict__ x, int n, int k,
                                float* __restrict__ out_val, int* __restrict__ out_idx) {
    __shared__ unsigned hist[256];
    __shared__ unsigned sel_prefix, sel_remaining;
    __shared__ unsigned n_above, n_equal;
    __shared__ float vals[1024];
    __shared__ int idxs[1024];
    const float* r = x + (size_t)blockIdx.x * n;
    unsigned prefix = 0, mask = 0, remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            unsigned u = key_of(r[i]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned cum = 0;
            int b = 255;
            for (; b > 0; --b) {
                if (cum + hist[b] >= remaining) break;
                cum += hist[b];
            }
            sel_prefix = prefix | ((unsigned)b << shift);
            sel_remaining = remaining - cum;
        }
        __syncthreads();
        prefix = sel_prefix;
        remaining = sel_remaining;
        mask |= 255u << shift;
        __syncthreads();
    }
    // prefix is now the k-th largest key; `remaining` of the keys equal to it are taken.
    if (threadIdx.x == 0) {
        n_above = 0;
        n_equal = 0;
    }
    for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
        vals[i] = -INFINITY;
        idxs[i] = 0x7fffffff;
    }
    __syncthreads();
    unsigned above = k - remaining;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = r[i];
        unsigned u = key_of(v);
        if (u > prefix) {
            unsigned slot = atomicAdd(&n_above, 1u);
            vals[slot] = v;
            idxs[slot] = i;
        } else if (u == prefix) {
            unsigned slot = atomicAdd(&n_equal, 1u);
            if (slot < remaining) {
                vals[above + slot] = v;
                idxs[above + slot] = i;
            }
        }
    }
    __syncthreads();
    // Bitonic sort of 1024 (value desc, index asc).
    for (int size = 2; size <= 1024; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            int i = threadIdx.x;
            int j = i ^ stride;
            if (j > i) {
                bool desc = (i & size) == 0;
                float vi = vals[i], vj = vals[j];
                int ii = idxs[i], ij = idxs[j];
                bool i_first = vi > vj || (vi == vj && ii < ij);
                if (desc != i_first) {
                    vals[i] = vj; vals[j] = vi;
                    idxs[i] = ij; idxs[j] = ii;
                }
            }
            __syncthreads();
        }
    }
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        out_val[(size_t)blockIdx.x * k + i] = vals[i];
        out_idx[(size_t)blockIdx.x * k + i] = idxs[i];
    }
}

