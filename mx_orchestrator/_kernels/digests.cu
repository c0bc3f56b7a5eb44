// Device kernels for mx_orchestrator's integrity checks (issue 23).
//
// Built ahead of time by scripts/build_kernels (NVRTC: no nvcc, no compile in a
// user's process) into one cubin per architecture plus PTX for newer ones; the
// definitions they implement live in mx_orchestrator/digests.py (the tree
// digest) and mx_orchestrator/integrity.py (mxsum1), whose host references the
// bench compares them with, bit for bit.
//
// Both kernels take many tensors at once, as three arrays of `count` entries:
// the base address, the size in bytes, and a running count of work items
// (chunks or blocks) before each tensor (count + 1 entries), so one launch
// covers a whole part of a load.

typedef unsigned int u32;
typedef unsigned long long u64;

extern "C" {

// ---------------------------------------------------------------------------
// sha256t64k leaves: SHA-256 of every 64 KiB chunk, one thread per chunk.

__constant__ u32 K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

__device__ __forceinline__ u32 rotr(u32 x, int n) { return __funnelshift_r(x, x, n); }
__device__ __forceinline__ u32 bswap(u32 x) { return __byte_perm(x, 0, 0x0123); }

__device__ __forceinline__ void compress(u32 st[8], u32 w[16]) {
    u32 a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
#pragma unroll
    for (int i = 0; i < 64; i++) {
        u32 wi;
        if (i < 16) {
            wi = w[i];
        } else {
            u32 x = w[(i + 1) & 15], y = w[(i + 14) & 15];
            u32 s0 = rotr(x, 7) ^ rotr(x, 18) ^ (x >> 3);
            u32 s1 = rotr(y, 17) ^ rotr(y, 19) ^ (y >> 10);
            wi = w[i & 15] + s0 + w[(i + 9) & 15] + s1;
            w[i & 15] = wi;
        }
        u32 t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + wi;
        u32 t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    st[0] += a; st[1] += b; st[2] += c; st[3] += d; st[4] += e; st[5] += f; st[6] += g; st[7] += h;
}

// The tensor that owns work item `item`: the last i with first[i] <= item.
__device__ __forceinline__ int owner(const u64* first, int count, u64 item) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (first[mid] <= item) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The tail of a message (0-63 bytes at `tail`), the 0x80 marker and the length in bits, big-endian.
__device__ __forceinline__ void finish(u32 st[8], const unsigned char* tail, u32 rest, u64 len) {
    u32 w[16];
#pragma unroll
    for (int k = 0; k < 16; k++) w[k] = 0;
    for (u32 i = 0; i < rest; i++) w[i >> 2] |= (u32)tail[i] << (24 - 8 * (i & 3));
    w[rest >> 2] |= 0x80u << (24 - 8 * (rest & 3));
    if (rest >= 56) {
        compress(st, w);
#pragma unroll
        for (int k = 0; k < 16; k++) w[k] = 0;
    }
    u64 bits = len << 3;
    w[14] = (u32)(bits >> 32);
    w[15] = (u32)bits;
    compress(st, w);
}

// SHA-256 of `len` bytes at `p`, into `out` (32 bytes, 16-byte aligned), as hashlib's digest.
__device__ __forceinline__ void sha256(const unsigned char* p, u32 len, uint4* out) {
    u32 st[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    u32 w[16];
    u32 full = len >> 6;
    if (((u64)p & 15) == 0) {
        const uint4* q = (const uint4*)p;
        for (u32 blk = 0; blk < full; blk++) {
#pragma unroll
            for (int k = 0; k < 4; k++) {
                uint4 v = __ldg(q + blk * 4 + k);
                w[4 * k] = bswap(v.x); w[4 * k + 1] = bswap(v.y); w[4 * k + 2] = bswap(v.z); w[4 * k + 3] = bswap(v.w);
            }
            compress(st, w);
        }
    } else {
        for (u32 blk = 0; blk < full; blk++) {
#pragma unroll
            for (int k = 0; k < 16; k++) {
                const unsigned char* b = p + blk * 64 + 4 * k;
                w[k] = ((u32)b[0] << 24) | ((u32)b[1] << 16) | ((u32)b[2] << 8) | (u32)b[3];
            }
            compress(st, w);
        }
    }
    finish(st, p + ((u64)full << 6), len & 63, len);
    out[0] = make_uint4(bswap(st[0]), bswap(st[1]), bswap(st[2]), bswap(st[3]));
    out[1] = make_uint4(bswap(st[4]), bswap(st[5]), bswap(st[6]), bswap(st[7]));
}

// Level 1: SHA-256 of every 64 KiB chunk of every tensor, a thread per chunk.
__global__ void sha256t_leaves(const u64* ptrs, const u64* sizes, const u64* first, int count,
                               u64 total, uint4* leaves) {
    u64 item = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= total) return;
    int t = owner(first, count, item);
    u64 start = (item - first[t]) << 16;
    u64 left = sizes[t] - start;
    u32 len = left < 65536ull ? (u32)left : 65536u;
    sha256((const unsigned char*)ptrs[t] + start, len, leaves + 2 * item);
}

// Level 2: SHA-256 of each run of up to 1,024 consecutive leaves of one tensor, a thread per run.
// `leaf_first` and `node_first` count leaves and nodes before each tensor (count + 1 entries).
__global__ void sha256t_nodes(const u64* leaf_first, const u64* node_first, int count, u64 total,
                              const uint4* leaves, uint4* nodes) {
    u64 node = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (node >= total) return;
    int t = owner(node_first, count, node);
    u64 start = leaf_first[t] + ((node - node_first[t]) << 10);
    u64 end = start + 1024 < leaf_first[t + 1] ? start + 1024 : leaf_first[t + 1];
    sha256((const unsigned char*)(leaves + 2 * start), (u32)((end - start) * 32), nodes + 2 * node);
}

// ---------------------------------------------------------------------------
// mxsum1 partial sums: a warp reads one 4 KiB block (1,024 int32 words, zero
// padded past the tensor's end) at a time, over a run of `run` blocks.
//   scalars[t] = (sum (2b+1) s_b, sum s_b, sum s_b^2)   (mod 2^64)
//   columns[t][j] = c_j                                 (mod 2^64)
// Lane l holds columns 128k + 4l + i (k < 8, i < 4): every load is coalesced.

__device__ __forceinline__ u32 word_at(const unsigned char* base, u64 n, u64 at) {
    u32 w = 0;
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (at + i < n) w |= (u32)base[at + i] << (8 * i);
    return w;
}

__device__ __forceinline__ void flush(int t, u64 cols[32], u64 a1, u64 a3, u64 a5, int lane,
                                      u64* scalars, u64* columns) {
    u64* mine = columns + (u64)t * 1024;
#pragma unroll
    for (int k = 0; k < 8; k++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            atomicAdd(mine + 128 * k + 4 * lane + i, cols[4 * k + i]);
            cols[4 * k + i] = 0;
        }
    if (lane == 0) {
        atomicAdd(scalars + 3 * t, a1);
        atomicAdd(scalars + 3 * t + 1, a3);
        atomicAdd(scalars + 3 * t + 2, a5);
    }
}

// One warp sums a run of 4 KiB blocks; with `dsts`, it also writes every byte it read there (the
// fused copy: the checksum is of the bytes this kernel moved, read once from HBM, not twice).
// Always inlined with a constant `COPY`, so each kernel keeps only its own path.
__device__ __forceinline__ void mxsum1_run(bool COPY, const u64* ptrs, const u64* dsts, const u64* sizes,
                                           const u64* first, int count, u64 total, u64 run,
                                           u64* scalars, u64* columns) {
    u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    u64 begin = warp * run;
    if (begin >= total) return;
    u64 end = begin + run < total ? begin + run : total;
    int t = owner(first, count, begin);
    u64 cols[32];
#pragma unroll
    for (int i = 0; i < 32; i++) cols[i] = 0;
    u64 a1 = 0, a3 = 0, a5 = 0;
    for (u64 row = begin; row < end; row++) {
        while (row >= first[t + 1]) {
            flush(t, cols, a1, a3, a5, lane, scalars, columns);
            a1 = a3 = a5 = 0;
            t++;
        }
        u64 b = row - first[t];
        const unsigned char* base = (const unsigned char*)ptrs[t];
        unsigned char* out = COPY ? (unsigned char*)dsts[t] : nullptr;
        u64 n = sizes[t];
        u64 at = b << 12;
        long long s = 0;
        bool aligned = ((u64)base & 15) == 0 && (!COPY || ((u64)out & 15) == 0);
        if (at + 4096 <= n && aligned) {
            const uint4* q = (const uint4*)(base + at);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                uint4 v = __ldcs(q + 32 * k + lane);
                if (COPY) __stcs((uint4*)(out + at) + 32 * k + lane, v);
                long long x = (int)v.x, y = (int)v.y, z = (int)v.z, u = (int)v.w;
                cols[4 * k] += (u64)x; cols[4 * k + 1] += (u64)y; cols[4 * k + 2] += (u64)z; cols[4 * k + 3] += (u64)u;
                s += x + y + z + u;
            }
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) {
                u64 mine = at + 512 * k + 16 * lane;
                if (COPY)
                    for (u64 i = mine; i < mine + 16 && i < n; i++) out[i] = base[i];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    long long x = (int)word_at(base, n, mine + 4 * i);
                    cols[4 * k + i] += (u64)x;
                    s += x;
                }
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        u64 su = (u64)s;
        a1 += (2 * b + 1) * su;
        a3 += su;
        a5 += su * su;
    }
    flush(t, cols, a1, a3, a5, lane, scalars, columns);
}

__global__ void mxsum1_partials(const u64* ptrs, const u64* sizes, const u64* first, int count,
                                u64 total, u64 run, u64* scalars, u64* columns) {
    mxsum1_run(false, ptrs, nullptr, sizes, first, count, total, run, scalars, columns);
}

// mxsum1's sums of `count` tensors read at `ptrs`, each copied to `dsts` as it is read.
__global__ void mxsum1_copy_partials(const u64* ptrs, const u64* dsts, const u64* sizes, const u64* first,
                                     int count, u64 total, u64 run, u64* scalars, u64* columns) {
    mxsum1_run(true, ptrs, dsts, sizes, first, count, total, run, scalars, columns);
}

}  // extern "C"
