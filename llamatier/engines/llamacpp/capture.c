/*
 * llamatier attention capture: a ggml_backend_sched_eval_callback that asks
 * only for the `kq_soft_max-<layer>` nodes and reduces each one, inside the
 * callback, to attention mass per KV cell summed over heads and query rows.
 *
 * Only the stable prefix of struct ggml_tensor (type, buffer, ne, nb) is read
 * directly; name and data come from ggml's own accessors, passed in as
 * function pointers resolved through the library handle llama.cpp uses.
 * Python turns the sums into means (divide by rows) after llama_decode.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct lt_tensor_prefix {
    int type; /* enum ggml_type; 0 = GGML_TYPE_F32 */
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
};

typedef const char *(*lt_get_name_fn)(const void *t);
typedef void *(*lt_get_data_fn)(const void *t);
typedef bool (*lt_buf_is_host_fn)(void *buf);
typedef void (*lt_tensor_get_fn)(const void *t, void *data, size_t offset, size_t size);

typedef struct {
    lt_get_name_fn get_name;
    lt_get_data_fn get_data;
    lt_buf_is_host_fn buf_is_host;
    lt_tensor_get_fn tensor_get;
    int32_t n_layers;
    int32_t n_cap;     /* cells per layer in acc */
    double *acc;       /* [n_layers * n_cap]: sum over heads and query rows */
    double *rows;      /* [n_layers]: (query row x head) pairs summed */
    int32_t *n_kv;     /* [n_layers]: largest n_kv seen since reset */
    float *scratch;    /* one row, for tensors not in host memory */
    int64_t scratch_len;
    int64_t n_calls;
    double reduce_s;   /* time spent reducing, since reset */
    int32_t enabled;
    int32_t error;     /* 0 ok; 1 not f32; 2 n_kv > n_cap; 3 bad layer; 4 scratch too small */
} lt_capture;

static const char LT_PREFIX[] = "kq_soft_max-";

static double lt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

bool lt_eval_cb(void *t, bool ask, void *user_data) {
    lt_capture *c = (lt_capture *)user_data;
    const char *name = c->get_name(t);
    if (strncmp(name, LT_PREFIX, sizeof(LT_PREFIX) - 1) != 0) {
        return ask ? false : true;
    }
    if (ask) {
        return c->enabled != 0;
    }
    double t0 = lt_now();
    const struct lt_tensor_prefix *tp = (const struct lt_tensor_prefix *)t;
    int layer = atoi(name + sizeof(LT_PREFIX) - 1);
    if (layer < 0 || layer >= c->n_layers) { c->error = 3; return true; }
    if (tp->type != 0) { c->error = 1; return true; }
    const int64_t n_kv = tp->ne[0];
    if (n_kv > c->n_cap) { c->error = 2; return true; }
    const bool host = c->buf_is_host == NULL || tp->buffer == NULL || c->buf_is_host(tp->buffer);
    const char *base = host ? (const char *)c->get_data(t) : NULL;
    if (!host && c->scratch_len < n_kv) { c->error = 4; return true; }
    double *acc = c->acc + (int64_t)layer * c->n_cap;
    int64_t nrows = 0;
    for (int64_t i3 = 0; i3 < tp->ne[3]; i3++) {
        for (int64_t i2 = 0; i2 < tp->ne[2]; i2++) {
            for (int64_t i1 = 0; i1 < tp->ne[1]; i1++) {
                size_t off = (size_t)i1 * tp->nb[1] + (size_t)i2 * tp->nb[2] + (size_t)i3 * tp->nb[3];
                const float *row;
                if (host) {
                    row = (const float *)(base + off);
                } else {
                    c->tensor_get(t, c->scratch, off, (size_t)n_kv * sizeof(float));
                    row = c->scratch;
                }
                if (tp->nb[0] == sizeof(float)) {
                    for (int64_t i0 = 0; i0 < n_kv; i0++) acc[i0] += row[i0];
                } else {
                    const char *rb = (const char *)row;
                    for (int64_t i0 = 0; i0 < n_kv; i0++) acc[i0] += *(const float *)(rb + (size_t)i0 * tp->nb[0]);
                }
                nrows++;
            }
        }
    }
    c->rows[layer] += (double)nrows;
    if ((int32_t)n_kv > c->n_kv[layer]) c->n_kv[layer] = (int32_t)n_kv;
    c->n_calls++;
    c->reduce_s += lt_now() - t0;
    return true;
}
