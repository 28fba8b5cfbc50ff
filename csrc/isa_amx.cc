// The avx512bf16 kernels plus AMX tiles (amx_tile + amx_bf16) for bf16 / int8 / int4 panels times bf16 x
// (compiled with isa_avx512bf16.cc's flags and -mamx-tile -mamx-bf16; run only where the dispatcher saw AMX
// and the kernel granted this process the tile data state): isa_avx512.cc, compiled a third time.
#define ER_NATIVE_AVX512_BF16 1
#define ER_NATIVE_AMX 1
#include "isa_avx512.cc"
