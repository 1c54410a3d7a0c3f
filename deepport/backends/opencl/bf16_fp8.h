/* bf16, e4m3fn and UE8M0 <-> float by integer bit manipulation (OpenCL C 1.2, no extensions).
 *
 * bfloat16 and float8_e4m3fn travel as ushort / uchar: OpenCL C 1.2 has no such types and PoCL has no
 * fp16 arithmetic, so every conversion here uses integer operations and as_float / as_uint only.
 * float16 goes through the core vload_half / vstore_half_rte builtins instead (no `half` arithmetic).
 * The Python side prepends this file to each kernel source (no -I path, so build caches see it).
 */

#ifndef DEEPPORT_BF16_FP8_H
#define DEEPPORT_BF16_FP8_H

/* bf16 -> float: exact (bf16 is the upper half of a float). */
inline float bf16_to_float(ushort h) {
    return as_float(((uint)h) << 16);
}

/* float -> bf16, round to nearest even; NaN stays NaN (quietened), +-inf and overflow give +-inf. */
inline ushort float_to_bf16(float f) {
    uint u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (ushort)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (ushort)(u >> 16);
}

/* float8_e4m3fn -> float: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities;
 * 0x7f / 0xff are NaN; exponent 0 is subnormal (m * 2^-9). Exact for all 256 codes.
 * With DEEPPORT_FP32_DENORMS=1 (the device keeps float32 denormals, CL_FP_DENORM): the 7 magnitude
 * bits placed at float bits 20..26 read as 2^-120 times the value (a float denormal for exponent 0),
 * so one exact multiply by 2^120 decodes normals and subnormals alike. Otherwise the subnormal path
 * converts the integer mantissa, independent of the denormal mode. */
inline float e4m3_to_float(uchar x) {
    uint bits = (uint)x;
#if DEEPPORT_FP32_DENORMS
    float v = as_float(((bits & 0x80u) << 24) | ((bits & 0x7fu) << 20)) * 0x1p120f;
#else
    uint e = (bits >> 3) & 0xfu;
    uint m = bits & 0x7u;
    float mag = e != 0u ? as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0x1p-9f;
    float v = (bits & 0x80u) != 0u ? -mag : mag;
#endif
    return (bits & 0x7fu) == 0x7fu ? as_float(0x7fc00000u | ((bits & 0x80u) << 24)) : v;
}

/* float -> float8_e4m3fn, round to nearest even, saturating to +-448 (torch's .to(float8_e4m3fn) for
 * finite inputs of |x| <= 448 + half a step; callers scale into range first); NaN -> 0x7f. */
inline uchar float_to_e4m3(float f) {
    uint u = as_uint(f);
    uint sign = (u >> 24) & 0x80u;
    uint a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (uchar)(sign | 0x7fu);
    }
    if (a >= 0x43e80000u) { /* >= 464 (448 + half of its step 32) rounds past the largest code */
        return (uchar)(sign | 0x7eu);
    }
    if (a < 0x3c800000u) { /* below 2^-6: subnormal range, step 2^-9 */
        float mag = as_float(a) * 512.0f; /* exact: a power-of-two scaling of a value < 8 */
        float r = rint(mag);              /* round half to even */
        return (uchar)(sign | (uint)r);
    }
    /* normal: keep 3 mantissa bits of 23, round to nearest even on the 20 dropped bits */
    uint rounded = a + 0x7ffffu + ((a >> 20) & 1u);
    uint e = (rounded >> 23) - 120u;
    uint m = (rounded >> 20) & 0x7u;
    return (uchar)(sign | (e << 3) | m);
}

/* UE8M0 scale factor: a biased exponent byte e means 2^(e - 127), the fp32 bits e << 23 (e = 0 gives
 * 0.0 and e = 255 gives inf, exactly as deepport.kernels.fp8_layout.unpack_ue8m0 decodes them). */
inline float ue8m0_to_float(uint e) {
    return as_float((e & 0xffu) << 23);
}

/* The scale factor of K block `kb` in one row of packed UE8M0 words (four exponent bytes per int32,
 * K block 4*j + i in byte i of word j, little-endian). */
inline float ue8m0_packed_sf(__global const int *row, int kb) {
    uint word = (uint)row[kb >> 2];
    return ue8m0_to_float(word >> (8 * (kb & 3)));
}

/* a / b correctly rounded (IEEE round to nearest) for finite a and b != 0 on any device: OpenCL 1.2
 * allows 2.5 ulp for float division (unless built with -cl-fp32-correctly-rounded-divide-sqrt), so
 * the neighbours of the quotient q are tried while they leave a smaller residual |a - q b| (computed
 * with one rounding by fma); the quotient nearest to a / b leaves the smallest. */
inline float div_rn(float a, float b) {
    float q = a / b;
    float r = fabs(fma(-q, b, a));
    for (int i = 0; i < 4; ++i) {
        const float up = nextafter(q, INFINITY), down = nextafter(q, -INFINITY);
        const float r_up = fabs(fma(-up, b, a)), r_down = fabs(fma(-down, b, a));
        if (r_up < r) {
            q = up;
            r = r_up;
        } else if (r_down < r) {
            q = down;
            r = r_down;
        } else {
            break;
        }
    }
    return q;
}

#endif
