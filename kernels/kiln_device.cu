// kiln_device.cu — the CUDA device's own helper kernels (runtime/src/device/cuda.rs), the
// work around cuBLASLt that a GEMM call needs: rounding f32 operands to bf16/f16, moving FP8
// block scales into the layout cuBLASLt reads, adding a bias after a GEMM.
//
// NVRTC compiles it with no header at all (it has no CUDA headers), so the conversions are
// written with integer operations on the bits; the host shim (kernels/kiln_host.h) builds the
// same source with g++, which is how runtime/src/device/lt.rs tests their arithmetic.
// Every kernel runs 256 threads per block, one element per thread, and returns past the end.
// 16-bit outputs are declared `unsigned char*` (the manifest has no 16-bit element type) and
// written as `unsigned short`; their buffers are 2-byte aligned, as every device buffer is.

#if defined(__CUDACC__)
__device__ __forceinline__ unsigned kiln_dev_bits(float f) { return __float_as_uint(f); }
#else
static inline unsigned kiln_dev_bits(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
#endif

// The thread's element: one per thread over the whole grid.
__device__ __forceinline__ long long kiln_dev_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// Rounds `bits` right by `shift` (1..31) to nearest, ties to even.
__device__ __forceinline__ unsigned kiln_dev_round_shift(unsigned bits, unsigned shift) {
    const unsigned half = 1u << (shift - 1);
    const unsigned rest = bits & ((half << 1) - 1); // the bits shifted out
    unsigned out = bits >> shift;
    if (rest > half || (rest == half && (out & 1u))) out += 1;
    return out;
}

// f32 → bf16 bits, round to nearest even; NaN stays NaN (quiet), overflow becomes infinity.
__device__ __forceinline__ unsigned short kiln_dev_bf16(float f) {
    const unsigned u = kiln_dev_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    // A carry out of the mantissa moves into the exponent, up to infinity: what RNE does.
    return (unsigned short)kiln_dev_round_shift(u, 16);
}

// f32 → IEEE binary16 bits, round to nearest even, with subnormals; NaN stays NaN (quiet),
// values from 65520 up become infinity.
__device__ __forceinline__ unsigned short kiln_dev_f16(float f) {
    const unsigned u = kiln_dev_bits(f);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((a & 0x7fffffu) >> 13));
    const int exp = (int)(a >> 23) - 127 + 15; // the binary16 biased exponent
    if (exp >= 31) return (unsigned short)(sign | 0x7c00u);
    if (exp <= 0) {
        // Subnormal (or zero): the 24-bit significand shifted to units of 2^-24.
        if (exp < -10) return (unsigned short)sign;
        const unsigned m = (a & 0x7fffffu) | 0x800000u;
        return (unsigned short)(sign | kiln_dev_round_shift(m, (unsigned)(14 - exp)));
    }
    // Normal: exponent and mantissa together, so a carry rounds up into the exponent.
    const unsigned body = ((unsigned)exp << 23) | (a & 0x7fffffu);
    return (unsigned short)(sign | kiln_dev_round_shift(body, 13));
}

// y[i] = bf16(x[i]) for i < n.
extern "C" __global__ void __launch_bounds__(256) kiln_f32_to_bf16(
    const float* __restrict__ x, unsigned char* __restrict__ y, long long n) {
    const long long i = kiln_dev_index();
    if (i < n) ((unsigned short*)y)[i] = kiln_dev_bf16(x[i]);
}

// y[i] = f16(x[i]) for i < n.
extern "C" __global__ void __launch_bounds__(256) kiln_f32_to_f16(
    const float* __restrict__ x, unsigned char* __restrict__ y, long long n) {
    const long long i = kiln_dev_index();
    if (i < n) ((unsigned short*)y)[i] = kiln_dev_f16(x[i]);
}

// c[r * ldc + j] += bias[j] for r < m, j < n: a bias after a GEMM whose epilogue cannot add it.
extern "C" __global__ void __launch_bounds__(256) kiln_add_bias(
    float* __restrict__ c, const float* __restrict__ bias, long long m, long long n,
    long long ldc) {
    const long long i = kiln_dev_index();
    if (i >= m * n) return;
    const long long r = i / n, j = i % n;
    c[r * ldc + j] += bias[j];
}

// y[r * row_stride + j * col_stride] = x[r * cols + j] for r < rows, j < cols: a row-major
// table of block scales moved into the layout cuBLASLt reads (transposed, or with padded rows).
extern "C" __global__ void __launch_bounds__(256) kiln_relayout_scales(
    const float* __restrict__ x, float* __restrict__ y, long long rows, long long cols,
    long long row_stride, long long col_stride) {
    const long long i = kiln_dev_index();
    if (i >= rows * cols) return;
    const long long r = i / cols, j = i % cols;
    y[r * row_stride + j * col_stride] = x[i];
}
