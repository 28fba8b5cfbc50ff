// The AVX-512 kernels plus vdpbf16ps (compiled with isa_avx512.cc's flags and -mavx512bf16; run only where
// the dispatcher saw avx512_bf16 too): isa_avx512.cc, compiled a second time with its bf16 part enabled.
#define ER_NATIVE_AVX512_BF16 1
#include "isa_avx512.cc"
