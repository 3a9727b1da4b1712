/* OpenCL host runtime: see ocl_runtime.h. */
#include "ocl_runtime.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DDNN_OCL_MAX_PLATFORMS 16
#define DDNN_OCL_MAX_DEVICES 32
#define DDNN_OCL_NAME_LEN 256

#ifndef CL_PLATFORM_NOT_FOUND_KHR
#define CL_PLATFORM_NOT_FOUND_KHR -1001 /* cl_khr_icd: the ICD loader found no driver */
#endif

/* One list gives both the codes and their names, so the table cannot drift. */
#define DDNN_OCL_ERRORS(X) \
    X(CL_SUCCESS) X(CL_DEVICE_NOT_FOUND) X(CL_DEVICE_NOT_AVAILABLE) X(CL_COMPILER_NOT_AVAILABLE) \
    X(CL_MEM_OBJECT_ALLOCATION_FAILURE) X(CL_OUT_OF_RESOURCES) X(CL_OUT_OF_HOST_MEMORY) \
    X(CL_PROFILING_INFO_NOT_AVAILABLE) X(CL_MEM_COPY_OVERLAP) X(CL_IMAGE_FORMAT_MISMATCH) \
    X(CL_IMAGE_FORMAT_NOT_SUPPORTED) X(CL_BUILD_PROGRAM_FAILURE) X(CL_MAP_FAILURE) \
    X(CL_MISALIGNED_SUB_BUFFER_OFFSET) X(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST) \
    X(CL_COMPILE_PROGRAM_FAILURE) X(CL_LINKER_NOT_AVAILABLE) X(CL_LINK_PROGRAM_FAILURE) \
    X(CL_DEVICE_PARTITION_FAILED) X(CL_KERNEL_ARG_INFO_NOT_AVAILABLE) \
    X(CL_INVALID_VALUE) X(CL_INVALID_DEVICE_TYPE) X(CL_INVALID_PLATFORM) X(CL_INVALID_DEVICE) \
    X(CL_INVALID_CONTEXT) X(CL_INVALID_QUEUE_PROPERTIES) X(CL_INVALID_COMMAND_QUEUE) \
    X(CL_INVALID_HOST_PTR) X(CL_INVALID_MEM_OBJECT) X(CL_INVALID_IMAGE_FORMAT_DESCRIPTOR) \
    X(CL_INVALID_IMAGE_SIZE) X(CL_INVALID_SAMPLER) X(CL_INVALID_BINARY) X(CL_INVALID_BUILD_OPTIONS) \
    X(CL_INVALID_PROGRAM) X(CL_INVALID_PROGRAM_EXECUTABLE) X(CL_INVALID_KERNEL_NAME) \
    X(CL_INVALID_KERNEL_DEFINITION) X(CL_INVALID_KERNEL) X(CL_INVALID_ARG_INDEX) X(CL_INVALID_ARG_VALUE) \
    X(CL_INVALID_ARG_SIZE) X(CL_INVALID_KERNEL_ARGS) X(CL_INVALID_WORK_DIMENSION) \
    X(CL_INVALID_WORK_GROUP_SIZE) X(CL_INVALID_WORK_ITEM_SIZE) X(CL_INVALID_GLOBAL_OFFSET) \
    X(CL_INVALID_EVENT_WAIT_LIST) X(CL_INVALID_EVENT) X(CL_INVALID_OPERATION) X(CL_INVALID_GL_OBJECT) \
    X(CL_INVALID_BUFFER_SIZE) X(CL_INVALID_MIP_LEVEL) X(CL_INVALID_GLOBAL_WORK_SIZE) \
    X(CL_INVALID_PROPERTY) X(CL_INVALID_IMAGE_DESCRIPTOR) X(CL_INVALID_COMPILER_OPTIONS) \
    X(CL_INVALID_LINKER_OPTIONS) X(CL_INVALID_DEVICE_PARTITION_COUNT) X(CL_PLATFORM_NOT_FOUND_KHR)

#define DDNN_OCL_ERROR_CASE(name) \
    case name:                    \
        return #name;

const char *ddnn_ocl_error_name(cl_int err)
{
    switch (err) {
        DDNN_OCL_ERRORS(DDNN_OCL_ERROR_CASE)
    default:
        return "CL_UNKNOWN_ERROR";
    }
}

int ddnn_ocl_check(cl_int err, const char *what)
{
    if (err == CL_SUCCESS)
        return 0;
    fprintf(stderr, "ddnn-ocl: %s: %s (%d)\n", what, ddnn_ocl_error_name(err), (int)err);
    return -1;
}

static const char *const install_hint =
    "install an OpenCL driver: on Debian/Ubuntu `apt-get install pocl-opencl-icd ocl-icd-libopencl1` "
    "(PoCL runs the kernels on the CPU) or your GPU vendor's OpenCL ICD; drivers are registered in "
    "/etc/OpenCL/vendors (the OCL_ICD_VENDORS environment variable overrides that folder)";

static int contains_ignore_case(const char *haystack, const char *needle)
{
    size_t h, n, len_h = strlen(haystack), len_n = strlen(needle);
    for (h = 0; h + len_n <= len_h; ++h) {
        for (n = 0; n < len_n; ++n)
            if (tolower((unsigned char)haystack[h + n]) != tolower((unsigned char)needle[n]))
                break;
        if (n == len_n)
            return 1;
    }
    return 0;
}

static int is_index(const char *text)
{
    if (*text == '\0')
        return 0;
    for (; *text != '\0'; ++text)
        if (!isdigit((unsigned char)*text))
            return 0;
    return 1;
}

/* Index of the entry matching sel among names[count], or -1 after listing what exists. */
static int pick(char names[][DDNN_OCL_NAME_LEN], cl_uint count, const char *sel, const char *what, const char *env)
{
    cl_uint i;
    if (sel == NULL || *sel == '\0')
        return 0;
    if (is_index(sel)) {
        long index = strtol(sel, NULL, 10);
        if (index >= 0 && (cl_uint)index < count)
            return (int)index;
    } else {
        for (i = 0; i < count; ++i)
            if (contains_ignore_case(names[i], sel))
                return (int)i;
    }
    fprintf(stderr, "ddnn-ocl: no OpenCL %s matches '%s' (from --%s or %s); available:", what, sel, what, env);
    for (i = 0; i < count; ++i)
        fprintf(stderr, " %u: %s;", (unsigned)i, names[i]);
    fprintf(stderr, "\n");
    return -1;
}

static const char *env_or(const char *value, const char *env_name)
{
    return (value != NULL && *value != '\0') ? value : getenv(env_name);
}

int ddnn_ocl_open(ddnn_ocl_env *env, const char *platform_sel, const char *device_sel, int verbose)
{
    cl_platform_id platforms[DDNN_OCL_MAX_PLATFORMS];
    cl_device_id devices[DDNN_OCL_MAX_DEVICES];
    char names[DDNN_OCL_MAX_DEVICES][DDNN_OCL_NAME_LEN];
    cl_uint n_platforms = 0, n_devices = 0, i;
    cl_int err;
    int chosen;

    memset(env, 0, sizeof(*env));
    platform_sel = env_or(platform_sel, "DDNN_OCL_PLATFORM");
    device_sel = env_or(device_sel, "DDNN_OCL_DEVICE");
    err = clGetPlatformIDs(DDNN_OCL_MAX_PLATFORMS, platforms, &n_platforms);
    if (err == CL_PLATFORM_NOT_FOUND_KHR || (err == CL_SUCCESS && n_platforms == 0)) {
        fprintf(stderr, "ddnn-ocl: no OpenCL platform found; %s\n", install_hint);
        return -1;
    }
    if (ddnn_ocl_check(err, "clGetPlatformIDs") != 0)
        return -1;
    if (n_platforms > DDNN_OCL_MAX_PLATFORMS)
        n_platforms = DDNN_OCL_MAX_PLATFORMS;
    for (i = 0; i < n_platforms; ++i)
        if (ddnn_ocl_check(clGetPlatformInfo(platforms[i], CL_PLATFORM_NAME, DDNN_OCL_NAME_LEN, names[i], NULL),
                           "clGetPlatformInfo(CL_PLATFORM_NAME)") != 0)
            return -1;
    if ((chosen = pick(names, n_platforms, platform_sel, "platform", "DDNN_OCL_PLATFORM")) < 0)
        return -1;
    env->platform = platforms[chosen];
    err = clGetDeviceIDs(env->platform, CL_DEVICE_TYPE_ALL, DDNN_OCL_MAX_DEVICES, devices, &n_devices);
    if (err == CL_DEVICE_NOT_FOUND || (err == CL_SUCCESS && n_devices == 0)) {
        fprintf(stderr, "ddnn-ocl: OpenCL platform '%s' has no devices; %s\n", names[chosen], install_hint);
        return -1;
    }
    if (ddnn_ocl_check(err, "clGetDeviceIDs") != 0)
        return -1;
    if (n_devices > DDNN_OCL_MAX_DEVICES)
        n_devices = DDNN_OCL_MAX_DEVICES;
    for (i = 0; i < n_devices; ++i)
        if (ddnn_ocl_check(clGetDeviceInfo(devices[i], CL_DEVICE_NAME, DDNN_OCL_NAME_LEN, names[i], NULL),
                           "clGetDeviceInfo(CL_DEVICE_NAME)") != 0)
            return -1;
    if ((chosen = pick(names, n_devices, device_sel, "device", "DDNN_OCL_DEVICE")) < 0)
        return -1;
    env->device = devices[chosen];
    if (verbose)
        fprintf(stderr, "ddnn-ocl: device %s\n", names[chosen]);
    env->context = clCreateContext(NULL, 1, &env->device, NULL, NULL, &err);
    if (ddnn_ocl_check(err, "clCreateContext") != 0) {
        ddnn_ocl_close(env);
        return -1;
    }
    /* clCreateCommandQueue is deprecated in 2.0 but is the 1.2 API every driver has. */
    env->queue = clCreateCommandQueue(env->context, env->device, 0, &err);
    if (ddnn_ocl_check(err, "clCreateCommandQueue") != 0) {
        ddnn_ocl_close(env);
        return -1;
    }
    return 0;
}

static void print_build_log(const ddnn_ocl_env *env)
{
    char small[4096];
    size_t size = 0;
    char *log;
    if (ddnn_ocl_check(clGetProgramBuildInfo(env->program, env->device, CL_PROGRAM_BUILD_LOG, 0, NULL, &size),
                       "clGetProgramBuildInfo(CL_PROGRAM_BUILD_LOG size)") != 0)
        return;
    /* Off the inference path: a heap buffer only when the log does not fit the stack one. */
    log = size <= sizeof(small) ? small : (char *)malloc(size);
    if (log == NULL) {
        fprintf(stderr, "ddnn-ocl: build log of %lu bytes does not fit in memory\n", (unsigned long)size);
        return;
    }
    if (ddnn_ocl_check(clGetProgramBuildInfo(env->program, env->device, CL_PROGRAM_BUILD_LOG, size, log, NULL),
                       "clGetProgramBuildInfo(CL_PROGRAM_BUILD_LOG)") == 0) {
        log[size > 0 ? size - 1 : 0] = '\0';
        fprintf(stderr, "ddnn-ocl: kernel build log:\n%s\n", log);
    }
    if (log != small)
        free(log);
}

int ddnn_ocl_build(ddnn_ocl_env *env, const char *source, const char *options)
{
    cl_int err;
    env->program = clCreateProgramWithSource(env->context, 1, &source, NULL, &err);
    if (ddnn_ocl_check(err, "clCreateProgramWithSource") != 0)
        return -1;
    err = clBuildProgram(env->program, 1, &env->device, options, NULL, NULL);
    if (err != CL_SUCCESS) {
        ddnn_ocl_check(err, "clBuildProgram (the generated kernels did not compile)");
        print_build_log(env);
        return -1;
    }
    return 0;
}

cl_mem ddnn_ocl_buffer(ddnn_ocl_env *env, cl_mem_flags flags, size_t bytes, const void *host, const char *what)
{
    cl_int err;
    cl_mem mem;
    /* CL_MEM_COPY_HOST_PTR only reads host; the API's pointer is not const. */
    mem = clCreateBuffer(env->context, flags | (host != NULL ? CL_MEM_COPY_HOST_PTR : 0), bytes > 0 ? bytes : 1,
                         (void *)host, &err);
    if (ddnn_ocl_check(err, what) != 0)
        return NULL;
    return mem;
}

cl_kernel ddnn_ocl_kernel(ddnn_ocl_env *env, const char *name)
{
    cl_int err;
    cl_kernel kernel = clCreateKernel(env->program, name, &err);
    if (err != CL_SUCCESS) {
        fprintf(stderr, "ddnn-ocl: clCreateKernel(%s): %s (%d)\n", name, ddnn_ocl_error_name(err), (int)err);
        return NULL;
    }
    return kernel;
}

void ddnn_ocl_close(ddnn_ocl_env *env)
{
    if (env->program != NULL)
        ddnn_ocl_check(clReleaseProgram(env->program), "clReleaseProgram");
    if (env->queue != NULL)
        ddnn_ocl_check(clReleaseCommandQueue(env->queue), "clReleaseCommandQueue");
    if (env->context != NULL)
        ddnn_ocl_check(clReleaseContext(env->context), "clReleaseContext");
    memset(env, 0, sizeof(*env));
}

void ddnn_ocl_device_name(const ddnn_ocl_env *env, char *buf, size_t len)
{
    if (len == 0)
        return;
    if (env->device == NULL || clGetDeviceInfo(env->device, CL_DEVICE_NAME, len, buf, NULL) != CL_SUCCESS) {
        strncpy(buf, "?", len);
    }
    buf[len - 1] = '\0';
}
