/* classify: the MNIST test digits through lenet5, the C library `cnnc compile --emit lib`
   writes, without Python.

       classify [--weights FILE] [--batch N] [--limit N] [--out FILE] IMAGES [LABELS]

   IMAGES and LABELS are IDX files (t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
   uncompressed: the Makefile unpacks them). It prints each of the first ten images'
   class and, with LABELS, the accuracy; --out writes every output row as raw floats (the
   tests compare them with the Python module's forward). Pixels are scaled to [0, 1] as
   cnnc train scales them. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lenet5.h"

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *file = fopen(path, "rb");
    if (file == NULL) return NULL;
    unsigned char *data = NULL;
    size_t have = 0, room = 0;
    for (;;) {
        if (have == room) {
            room = room ? 2 * room : 1 << 20;
            unsigned char *grown = realloc(data, room);
            if (grown == NULL) break;
            data = grown;
        }
        size_t got = fread(data + have, 1, room - have, file);
        have += got;
        if (got == 0) break;
    }
    int failed = ferror(file);
    fclose(file);
    if (failed) {
        free(data);
        return NULL;
    }
    *size = have;
    return data;
}

static uint32_t big_endian(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* the items of an IDX file of `dims` dimensions with magic `magic`; NULL if it is not one */
static const unsigned char *idx_items(const unsigned char *data, size_t size, uint32_t magic,
                                      int dims, uint32_t *shape) {
    size_t header = 4 + 4 * (size_t)dims, count = 1;
    if (size < header || big_endian(data) != magic) return NULL;
    for (int i = 0; i < dims; i++) {
        shape[i] = big_endian(data + 4 + 4 * i);
        if (shape[i] != 0 && count > SIZE_MAX / shape[i]) return NULL; /* no such file fits */
        count *= shape[i];
    }
    return size - header >= count ? data + header : NULL;
}

static int usage(void) {
    fprintf(stderr, "usage: classify [--weights FILE] [--batch N] [--limit N] [--out FILE] "
                    "IMAGES [LABELS]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *weights = "lenet5.weights.bin", *out_path = NULL, *paths[2] = {NULL, NULL};
    long batch = 64, limit = -1;
    int given = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--weights") == 0 && i + 1 < argc) weights = argv[++i];
        else if (strcmp(argv[i], "--embedded") == 0) weights = NULL;
        else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc) batch = atol(argv[++i]);
        else if (strcmp(argv[i], "--limit") == 0 && i + 1 < argc) limit = atol(argv[++i]);
        else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) out_path = argv[++i];
        else if (argv[i][0] != '-' && given < 2) paths[given++] = argv[i];
        else return usage();
    }
    if (given == 0 || batch < 1 || batch > 1 << 20) return usage();

    size_t image_bytes = 0, label_bytes = 0;
    unsigned char *image_file = read_file(paths[0], &image_bytes);
    unsigned char *label_file = paths[1] ? read_file(paths[1], &label_bytes) : NULL;
    uint32_t shape[3] = {0, 0, 0}, label_count = 0;
    const unsigned char *pixels =
        image_file ? idx_items(image_file, image_bytes, 2051, 3, shape) : NULL;
    const unsigned char *labels =
        label_file ? idx_items(label_file, label_bytes, 2049, 1, &label_count) : NULL;
    if (pixels == NULL || (uint64_t)shape[1] * shape[2] != LENET5_INPUT_SIZE) {
        fprintf(stderr, "classify: %s is no IDX file of 28x28 images\n", paths[0]);
        return 1;
    }
    if (paths[1] && (labels == NULL || label_count != shape[0])) {
        fprintf(stderr, "classify: %s is no IDX file of %u labels\n", paths[1], shape[0]);
        return 1;
    }
    size_t count = limit >= 0 && (uint32_t)limit < shape[0] ? (size_t)limit : shape[0];

    lenet5_model *model = NULL;
    int status = lenet5_init(&model, weights);
    if (status != LENET5_OK) {
        fprintf(stderr, "classify: %s: %s\n", weights ? weights : "embedded weights",
                lenet5_strerror(status));
        return 1;
    }
    float *x = malloc(sizeof(float) * LENET5_INPUT_SIZE * batch);
    float *y = malloc(sizeof(float) * LENET5_OUTPUT_SIZE * batch);
    void *work = malloc(lenet5_workspace_size((int)batch));
    FILE *out = out_path ? fopen(out_path, "wb") : NULL;
    if (x == NULL || y == NULL || work == NULL) {
        fprintf(stderr, "classify: out of memory\n");
        return 1;
    }
    if (out_path && out == NULL) {
        fprintf(stderr, "classify: cannot write %s\n", out_path);
        return 1;
    }
    size_t right = 0;
    for (size_t start = 0; start < count; start += (size_t)batch) {
        int n = (int)(count - start < (size_t)batch ? count - start : (size_t)batch);
        for (size_t i = 0; i < (size_t)n * LENET5_INPUT_SIZE; i++)
            x[i] = (float)pixels[start * LENET5_INPUT_SIZE + i] / 255.0f;
        status = lenet5_forward(model, x, n, y, work);
        if (status != LENET5_OK) {
            fprintf(stderr, "classify: forward: %s\n", lenet5_strerror(status));
            return 1;
        }
        if (out && fwrite(y, sizeof(float) * LENET5_OUTPUT_SIZE, (size_t)n, out) != (size_t)n) {
            fprintf(stderr, "classify: cannot write %s\n", out_path);
            return 1;
        }
        for (int s = 0; s < n; s++) {
            int best = 0;
            for (int k = 1; k < LENET5_OUTPUT_SIZE; k++)
                if (y[s * LENET5_OUTPUT_SIZE + k] > y[s * LENET5_OUTPUT_SIZE + best]) best = k;
            if (start + s < 10) printf("image %zu: class %d\n", start + s, best);
            right += labels && labels[start + s] == best;
        }
    }
    if (labels) printf("accuracy %.4f on %zu images\n", (double)right / count, count);
    if (out && fclose(out) != 0) {
        fprintf(stderr, "classify: cannot write %s\n", out_path);
        return 1;
    }
    free(work);
    free(y);
    free(x);
    lenet5_free(model);
    free(label_file);
    free(image_file);
    return 0;
}
