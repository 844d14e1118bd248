/* Cached cuSPARSELt matmul plans, called from Python through ctypes (see cslt_plans.py).
 *
 * torch._cslt_sparse_mm builds descriptors and a plan on every call and destroys them after, which
 * costs more CPU time than the GEMM takes on the GPU at ViT sizes (scripts/bench.py --only c). A
 * plan depends only on shapes, layouts, dtype and algorithm, so one is built per such key and
 * reused; a call is then one cusparseLtMatmul. The descriptors mirror torch's own (ATen
 * cuSPARSELtOps.cpp), so the compressed operand of torch._cslt_compress (or of our Triton kernel)
 * is read the same way.
 *
 * C-style C++ with a C ABI and no torch headers: it builds in a second with the system C++
 * compiler and does not depend on torch's C++ ABI. (C++ because cusparseLt.h is written for it:
 * a C build failed on the GPU image.)
 */
#include <cstdint>
#include <cstdlib>

#include <cusparseLt.h>

extern "C" {

typedef struct {
    /* Kept together and never moved: the plan may refer to the descriptors. */
    cusparseLtMatDescriptor_t sparse, dense, out;
    cusparseLtMatmulDescriptor_t matmul;
    cusparseLtMatmulAlgSelection_t alg;
    cusparseLtMatmulPlan_t plan;
    size_t workspace_bytes;
} st_plan;

static cusparseLtHandle_t handle;
static int handle_ready = 0;

#define TRY(call)                                     \
    do {                                              \
        cusparseStatus_t status_ = (call);            \
        if (status_ != CUSPARSE_STATUS_SUCCESS) {     \
            free(p);                                  \
            return (int)status_;                      \
        }                                             \
    } while (0)

/* A (m, k) compressed row-major; B (k, n) row-major, or (n, k) row-major read transposed;
 * D (m, n), column-major when transpose_result (so its memory is the (n, m) row-major result).
 * bias: NULL, or a device vector of m added in the epilogue. Its address is part of the plan,
 * so the caller keys plans by it (a layer's bias parameter keeps its storage across steps). */
int st_plan_create(int64_t m, int64_t n, int64_t k, int dense_row_major, int transpose_result,
                   int half, int alg_id, const void *bias, void **plan_out, size_t *workspace_out) {
    st_plan *p = NULL;
    if (!handle_ready) {
        TRY(cusparseLtInit(&handle));
        handle_ready = 1;
    }
    p = (st_plan *)calloc(1, sizeof(st_plan));
    if (p == NULL) return -1;
    cudaDataType type = half ? CUDA_R_16F : CUDA_R_16BF;
    TRY(cusparseLtStructuredDescriptorInit(&handle, &p->sparse, m, k, k, 16, type, CUSPARSE_ORDER_ROW,
                                           CUSPARSELT_SPARSITY_50_PERCENT));
    TRY(cusparseLtDenseDescriptorInit(&handle, &p->dense, dense_row_major ? k : n, dense_row_major ? n : k,
                                      dense_row_major ? n : k, 16, type, CUSPARSE_ORDER_ROW));
    TRY(cusparseLtDenseDescriptorInit(&handle, &p->out, m, n, transpose_result ? m : n, 16, type,
                                      transpose_result ? CUSPARSE_ORDER_COL : CUSPARSE_ORDER_ROW));
    TRY(cusparseLtMatmulDescriptorInit(&handle, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                       dense_row_major ? CUSPARSE_OPERATION_NON_TRANSPOSE : CUSPARSE_OPERATION_TRANSPOSE,
                                       &p->sparse, &p->dense, &p->out, &p->out, CUSPARSE_COMPUTE_32F));
    if (bias != NULL) {
        TRY(cusparseLtMatmulDescSetAttribute(&handle, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &bias, sizeof(bias)));
    }
    TRY(cusparseLtMatmulAlgSelectionInit(&handle, &p->alg, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
    TRY(cusparseLtMatmulAlgSetAttribute(&handle, &p->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg_id, sizeof(alg_id)));
    TRY(cusparseLtMatmulPlanInit(&handle, &p->plan, &p->matmul, &p->alg));
    TRY(cusparseLtMatmulGetWorkspace(&handle, &p->plan, &p->workspace_bytes));
    *plan_out = p;
    *workspace_out = p->workspace_bytes;
    return 0;
}

/* D = A @ op(B) on `stream` (a cudaStream_t passed as an integer by the caller). */
int st_matmul(void *plan, const void *a, const void *b, void *d, void *workspace, void *stream) {
    const st_plan *p = (const st_plan *)plan;
    float alpha = 1.0f, beta = 0.0f;
    cudaStream_t s = (cudaStream_t)stream;
    return (int)cusparseLtMatmul(&handle, &p->plan, &alpha, a, b, &beta, d, d, workspace, &s, 1);
}

const char *st_error_name(int status) {
    return cusparseLtGetErrorString(static_cast<cusparseStatus_t>(status));
}

}  // extern "C"
