/* Element-wise kernels exposing the conversions of bf16_fp8.h (and the core half builtins), one
 * work-item per element. The tests compare them with torch on every code; they double as a device
 * self-check on a new driver. OpenCL C 1.2. */

/* y[i] = CONVERT(x[i]) for one work-item per element */
#define ELEMENTWISE(name, in_type, out_type, convert)                          \
    __kernel void name(__global const in_type *x, __global out_type *y) {      \
        const size_t i = get_global_id(0);                                     \
        y[i] = convert(x[i]);                                                  \
    }

ELEMENTWISE(bf16_encode, float, ushort, float_to_bf16)
ELEMENTWISE(bf16_decode, ushort, float, bf16_to_float)
ELEMENTWISE(e4m3_encode, float, uchar, float_to_e4m3)
ELEMENTWISE(e4m3_decode, uchar, float, e4m3_to_float)

__kernel void half_encode(__global const float *x, __global ushort *y) {
    const size_t i = get_global_id(0);
    vstore_half_rte(x[i], 0, (__global half *)(y + i));
}

__kernel void half_decode(__global const ushort *x, __global float *y) {
    const size_t i = get_global_id(0);
    y[i] = vload_half(0, (__global const half *)(x + i));
}

/* y[row * k_blocks + kb] = the SF of K block kb in row `row` of packed UE8M0 words */
__kernel void ue8m0_decode(__global const int *words, int words_per_row, int k_blocks, __global float *y) {
    const int i = (int)get_global_id(0);
    const int row = i / k_blocks, kb = i % k_blocks;
    y[i] = ue8m0_packed_sf(words + (long)row * words_per_row, kb);
}

/* z[i] = x[i] / y[i] correctly rounded (div_rn) */
__kernel void div_rn_check(__global const float *x, __global const float *y, __global float *z) {
    const size_t i = get_global_id(0);
    z[i] = div_rn(x[i], y[i]);
}
