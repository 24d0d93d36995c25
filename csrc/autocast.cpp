// Device-generic autocast for atop. tch 0.24 only reaches libtorch's deprecated CUDA-only
// autocast switch; mixed precision on the CPU (bf16 with AVX512-BF16/AMX) and bf16 on CUDA
// need at::autocast's per-device API, exposed here as three C functions.
#include <ATen/autocast_mode.h>

extern "C" {

// Enables autocast with `dtype_code` (0 = bfloat16, 1 = float16) on device type `cuda ? CUDA :
// CPU`. Returns the previous enabled state, or -1 if libtorch threw.
int atop_autocast_enter(int cuda, int dtype_code) {
  try {
    auto dev = cuda ? at::kCUDA : at::kCPU;
    bool prev = at::autocast::is_autocast_enabled(dev);
    at::autocast::set_autocast_dtype(dev, dtype_code == 1 ? at::kHalf : at::kBFloat16);
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::increment_nesting();
    return prev ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Restores the previous state; clears the cast cache when the outermost region ends.
int atop_autocast_exit(int cuda, int prev) {
  try {
    auto dev = cuda ? at::kCUDA : at::kCPU;
    at::autocast::set_autocast_enabled(dev, prev != 0);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

}
