// im2col / col2im for convolution as GEMM (one sample [C, H, W] at a time, columns
// [C·KH·KW, HO·WO]); col2im gathers (each input pixel sums its own contributions), so it needs
// no atomics.

struct ConvGeom { i64 c, h, w, kh, kw, stride, pad, ho, wo; };

extern "C" __global__ void im2col_f32(const float* x, float* cols, ConvGeom g) {
    const i64 hw = g.ho * g.wo, n = g.c * g.kh * g.kw * hw;
    GRID_STRIDE(i, n) {
        const i64 ox = i % g.wo, oy = (i / g.wo) % g.ho, row = i / hw;
        const i64 kj = row % g.kw, ki = (row / g.kw) % g.kh, c = row / (g.kw * g.kh);
        const i64 iy = oy * g.stride + ki - g.pad, ix = ox * g.stride + kj - g.pad;
        cols[i] = (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) ? x[(c * g.h + iy) * g.w + ix] : 0.0f;
    }
}

extern "C" __global__ void col2im_f32(const float* cols, float* x, ConvGeom g) {
    const i64 hw = g.ho * g.wo, n = g.c * g.h * g.w;
    GRID_STRIDE(i, n) {
        const i64 ix = i % g.w, iy = (i / g.w) % g.h, c = i / (g.w * g.h);
        float acc = 0.0f;
        for (i64 ki = 0; ki < g.kh; ++ki) {
            const i64 ty = iy + g.pad - ki;
            if (ty < 0 || ty % g.stride != 0) continue;
            const i64 oy = ty / g.stride;
            if (oy >= g.ho) continue;
            for (i64 kj = 0; kj < g.kw; ++kj) {
                const i64 tx = ix + g.pad - kj;
                if (tx < 0 || tx % g.stride != 0) continue;
                const i64 ox = tx / g.stride;
                if (ox >= g.wo) continue;
                acc += cols[((c * g.kh + ki) * g.kw + kj) * hw + oy * g.wo + ox];
            }
        }
        x[i] += acc;
    }
}
