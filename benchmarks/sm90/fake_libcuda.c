/* A stand-in for the CUDA driver, so that jax's CUDA plugin compiles Mosaic GPU kernels on a machine without a
 * GPU (`benchmarks/kernel_resources.py`). It reports one device of compute capability 9.0 and refuses to load
 * a module, which is where compiling ends and running would begin. Nothing here runs a kernel. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

enum { SUCCESS = 0, NOT_SUPPORTED = 801, CC_MAJOR = 75, CC_MINOR = 76 };

int cuInit(unsigned flags) { return SUCCESS; }
int cuDriverGetVersion(int *version) { *version = 12080; return SUCCESS; }
int cuDeviceGetCount(int *count) { *count = 1; return SUCCESS; }
int cuDeviceGet(int *device, int ordinal) { *device = 0; return SUCCESS; }
int cuCtxGetDevice(int *device) { *device = 0; return SUCCESS; }

int cuDeviceGetAttribute(int *value, int attribute, int device) {
  *value = attribute == CC_MAJOR ? 9 : 0;
  return SUCCESS;
}

int cuModuleLoadData(void **module, const void *image) { return NOT_SUPPORTED; }

int cuGetErrorString(int error, const char **text) {
  *text = error == NOT_SUPPORTED ? "no GPU: the stand-in driver compiles, never loads" : "stand-in driver";
  return SUCCESS;
}

int cuGetErrorName(int error, const char **text) { return cuGetErrorString(error, text); }

int cuGetProcAddress(const char *symbol, void **fn, int version, unsigned long long flags, int *status) {
  *fn = dlsym(RTLD_DEFAULT, symbol);
  if (status) *status = *fn ? 0 : 1;
  return *fn ? SUCCESS : NOT_SUPPORTED;
}

int cuGetProcAddress_v2(const char *symbol, void **fn, int version, unsigned long long flags, int *status) {
  return cuGetProcAddress(symbol, fn, version, flags, status);
}
