/* OpenCL host runtime of the ddnngen OpenCL target: device selection, context, queue, program
 * build and buffers, every cl* call checked with a readable message. Model-independent; the
 * generated <name>_ocl_model.c uses it. OpenCL 1.2 API only, no vendor extensions.
 *
 * Errors are printed to stderr as one line "ddnn-ocl: <what>: <CL_ERROR_NAME> (<code>)" and
 * reported to the caller as -1 (or NULL); nothing here exits the process. */
#ifndef DDNN_OCL_RUNTIME_H
#define DDNN_OCL_RUNTIME_H

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#ifdef __APPLE__
#include <OpenCL/opencl.h>
#else
#include <CL/cl.h>
#endif

#include <stddef.h>

typedef struct {
    cl_platform_id platform;
    cl_device_id device;
    cl_context context;
    cl_command_queue queue;
    cl_program program;
} ddnn_ocl_env;

/* "CL_INVALID_VALUE" etc.; "CL_UNKNOWN_ERROR" for codes not in the OpenCL 1.2 list. */
const char *ddnn_ocl_error_name(cl_int err);

/* 0 if err is CL_SUCCESS, else prints "ddnn-ocl: what: NAME (code)" and returns -1. */
int ddnn_ocl_check(cl_int err, const char *what);

/* Picks a platform and a device, creates the context and an in-order queue.
 * platform_sel / device_sel: NULL or "" -> the DDNN_OCL_PLATFORM / DDNN_OCL_DEVICE environment
 * variables, else the first; a decimal index, or a case-insensitive part of the name.
 * With no platform at all it prints how to install PoCL. Returns 0 or -1 (env released). */
int ddnn_ocl_open(ddnn_ocl_env *env, const char *platform_sel, const char *device_sel, int verbose);

/* Builds `source` for env's device; on failure prints the compiler's build log. 0 or -1. */
int ddnn_ocl_build(ddnn_ocl_env *env, const char *source, const char *options);

/* clCreateBuffer with a checked result; `host` is copied when non-NULL (the buffer never
 * writes it back). NULL on failure, after printing `what`. */
cl_mem ddnn_ocl_buffer(ddnn_ocl_env *env, cl_mem_flags flags, size_t bytes, const void *host, const char *what);

/* clCreateKernel, checked. NULL on failure. */
cl_kernel ddnn_ocl_kernel(ddnn_ocl_env *env, const char *name);

/* Releases whatever env holds (safe on a partly opened env) and zeroes it. */
void ddnn_ocl_close(ddnn_ocl_env *env);

/* CL_DEVICE_NAME of env's device into buf ("?" when unavailable). */
void ddnn_ocl_device_name(const ddnn_ocl_env *env, char *buf, size_t len);

#endif
