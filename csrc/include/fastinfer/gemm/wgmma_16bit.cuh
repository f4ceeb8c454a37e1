// wgmma.mma_async for 16-bit inputs (bf16 / fp16, fp32 accumulators) as the sm_90a prefill and W4A16 use it:
//   mma_ss<N, T>:    D[64 x N] (+)= A[64 x 16] * B[16 x N], A and B in shared memory, both K-major
//                    (S = Q K^T over 128 keys: N = 128 only; Q rows and K rows have head_dim contiguous).
//   mma_rs_tb<N, T>: D[64 x N] (+)= A[64 x 16] * B[16 x N], A in registers (the m64k16 fragment: warp
//                    w of the warpgroup holds rows 16 w .. 16 w + 15 exactly as mma.m16n8k16's A), B in
//                    shared memory MN-major ("transposed": O += P V with V rows = keys, head_dim
//                    contiguous, i.e. N contiguous).
//   mma_rs<N, T>:    the same with B K-major (the W4A16 wgmma kernel: B = the activations' rows).
// D is viewed as [N / 8][4]: element [j][2 h + e] of a thread is row 16 warp + lane / 4 + 8 h, column
// 8 j + 2 (lane % 4) + e, the m16n8 accumulator layout of mma.sync, so the FlashAttention-2 softmax of
// prefill_softmax.cuh and its C -> A register reuse apply unchanged. scale_d = 0 overwrites D.
// Inline PTX (CCCL's cuda::ptx has no wgmma wrappers); the fence / commit / wait helpers are in
// wgmma_fp8.cuh. sm_90a only. The operand lists below are generated text, one block per N; a macro
// instantiates it for bf16 and fp16, whose instruction texts differ only in the type name.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace fastinfer::wgmma {

template <int N, typename T>
__device__ __forceinline__ void mma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d);
// A in registers, B in shared memory: RegisterA<N, T>::run<kTransB>, one instruction text per N and type with
// the B-transpose immediate as an operand. mma_rs_tb (B MN-major) and mma_rs (B K-major: the W4A16 wgmma
// kernel, w4a16_wgmma.cuh, where A is the dequantized weights and B the activations' rows) are its two uses.
template <int N, typename T>
struct RegisterA;

// The 64 accumulator operands of an m64n128 instruction: their numbers in the text, their constraints.
#define FI_WGMMA_D128_TEXT                                                                                 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "          \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "          \
    "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "          \
    "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63 "
#define FI_WGMMA_D128_OUT                                                                                  \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),        \
    "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),        \
    "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),        \
    "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),        \
    "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),        \
    "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),        \
    "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),      \
    "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),  \
    "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]),  \
    "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),  \
    "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])

// One definition per N below, instantiated for bf16 and fp16 (PTX type names "bf16" and "f16").
#define FI_WGMMA_SS_128(T, TYPE)                                                                          \
  template <>                                                                                              \
  __device__ __forceinline__ void mma_ss<128, T>(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b,       \
                                                 int scale_d) {                                            \
    asm volatile(                                                                                          \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                       \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                                  \
          FI_WGMMA_D128_TEXT                                                                             \
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                 \
        : FI_WGMMA_D128_OUT                                                                              \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                         \
  }

#define FI_WGMMA_RS_128(T, TYPE)                                                                          \
  template <>                                                                                              \
  struct RegisterA<128, T> {                                                                               \
    template <int kTransB>                                                                                 \
    __device__ __forceinline__ static void run(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b, \
                                               int scale_d) {                                              \
      asm volatile(                                                                                        \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                     \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                                \
          FI_WGMMA_D128_TEXT                                                                             \
          "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                                \
        : FI_WGMMA_D128_OUT                                                                              \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB));         \
    }                                                                                                      \
  };

#define FI_WGMMA_RS_64(T, TYPE)                                                                           \
  template <>                                                                                              \
  struct RegisterA<64, T> {                                                                                \
    template <int kTransB>                                                                                 \
    __device__ __forceinline__ static void run(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,  \
                                               int scale_d) {                                              \
      asm volatile(                                                                                        \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                     \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {"                                 \
          "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "          \
          "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31 "                                \
          "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                                \
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),        \
          "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),        \
          "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),        \
          "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),        \
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),        \
          "+f"(d[7][2]), "+f"(d[7][3])                                                                     \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB));         \
    }                                                                                                      \
  };

FI_WGMMA_SS_128(__nv_bfloat16, "bf16")
FI_WGMMA_SS_128(__half, "f16")
FI_WGMMA_RS_64(__nv_bfloat16, "bf16")
FI_WGMMA_RS_64(__half, "f16")
FI_WGMMA_RS_128(__nv_bfloat16, "bf16")
FI_WGMMA_RS_128(__half, "f16")
#undef FI_WGMMA_SS_128
#undef FI_WGMMA_RS_64
#undef FI_WGMMA_RS_128
#undef FI_WGMMA_D128_TEXT
#undef FI_WGMMA_D128_OUT

// mma_rs_tb<N, T>: B MN-major ("transposed", the prefill's V); mma_rs<N, T>: B K-major.
template <int N, typename T>
__device__ __forceinline__ void mma_rs_tb(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  RegisterA<N, T>::template run<1>(d, a, desc_b, scale_d);
}

template <int N, typename T>
__device__ __forceinline__ void mma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  RegisterA<N, T>::template run<0>(d, a, desc_b, scale_d);
}

}  // namespace fastinfer::wgmma
