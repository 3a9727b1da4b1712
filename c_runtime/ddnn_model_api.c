#include "ddnn_model_api.h"

#include <string.h>

void ddnn_infer_batch(const ddnn_model *model, const uint8_t *inputs, size_t n, double threshold, int32_t *class_id,
                      double *entropy, uint8_t *exit_local, uint64_t *split_words, double *logits)
{
    const size_t words = (size_t)model->split_words, classes = (size_t)model->n_classes;
    ddnn_result result;
    size_t i;
    for (i = 0; i < n; ++i) {
        model->infer(inputs + i * model->input_bytes, threshold, &result);
        class_id[i] = result.class_id;
        entropy[i] = result.entropy;
        exit_local[i] = (uint8_t)(result.exit_local != 0);
        if (split_words != NULL)
            memcpy(split_words + i * words, result.split, words * sizeof(uint64_t));
        if (logits != NULL)
            memcpy(logits + i * classes, result.logits, classes * sizeof(double));
    }
}
