"""The C text of a library: its header (the API and the network's constants) and the source
of its API (model.c.in with the layout's tables)."""

from __future__ import annotations

import math
from importlib import resources

from cnnc.graph.ir import DType
from cnnc.library.layout import Layout, aligned
from cnnc.library.weights import HEADER as WEIGHTS_HEADER
from cnnc.version import __version__

C_TYPES = {DType.F32: "float", DType.F64: "double"}
MAX_RANK = 6  # of a weight's shape in NET_params
STATUSES = (
    ("OK", "success"),
    ("ERR_NULL", "a pointer argument is null"),
    ("ERR_BATCH", "batch < 1, or a workspace too large to address"),
    ("ERR_OPEN", "the weights file cannot be opened or read (or: no file system, wasm32)"),
    ("ERR_SHORT", "the weights are shorter than this network's"),
    ("ERR_MISMATCH", "the weights are another network's: layout hash or size differs"),
    ("ERR_CORRUPT", "the weights' CRC-32 does not match: the file is damaged"),
    ("ERR_FORMAT", "not a cnnc weights file, or another format version"),
    ("ERR_MEMORY", "out of memory"),
    ("ERR_NO_WEIGHTS", "a NULL weights path, and no weights embedded in the library"),
    ("ERR_ALIGN", "x or y is not aligned to its element type"),
)


def header_text(layout: Layout, source_name: str, embedded: bool) -> str:
    net, upper = layout.net, layout.net.upper()
    scalar = C_TYPES[layout.dtype]
    weights = layout.of_kind("weight")
    major, minor, patch = [*__version__.split("."), "0", "0"][:3]
    last = len(STATUSES) - 1  # no comma after the last value: C89 and C++98 forbid one
    statuses = "\n".join(f"    {upper}_{name} = {code}{',' if code < last else ''} /* {text} */"
                         for code, (name, text) in enumerate(STATUSES))
    listed = "\n".join(f" *   {i:3d}  {w.name}: {' x '.join(map(str, w.shape))}"
                       for i, w in enumerate(weights))
    return HEADER.format(
        net=net, upper=upper, source=source_name, version=__version__, major=major,
        minor=minor, patch=patch.split("+")[0], scalar=scalar, dtype=layout.dtype.value,
        statuses=statuses, listed=listed, count=len(weights),
        in_rank=len(layout.input_shape), in_shape=_braces(layout.input_shape),
        in_size=math.prod(layout.input_shape), out_rank=len(layout.output_shape),
        out_shape=_braces(layout.output_shape), out_size=math.prod(layout.output_shape),
        hash=f"0x{layout.weights_hash:016x}ULL",
        file_bytes=WEIGHTS_HEADER.size + layout.weight_offsets()[1],
        embedded=int(embedded), max_rank=MAX_RANK)


def model_source(layout: Layout, has_pack: bool, embedded_bytes: int | None) -> str:
    """model.c.in for this network: its slot table, sizes and names."""
    template = resources.files("cnnc.library").joinpath("model.c.in").read_text("utf-8")
    net = layout.net
    pack = f"{net}__pack_kernels(1, table);" if has_pack else "/* no weights to repack */"
    text = (template.replace("@TABLES@", _tables(layout, embedded_bytes))
            .replace("@CRC_TABLE@", _crc_table())
            .replace("@PACK_CALL@", pack).replace("@API@", f"{net.upper()}_API"))
    return (text.replace("@UNET@", net.upper()).replace("@NET@", net)
            .replace("@SCALAR@", C_TYPES[layout.dtype]).replace("@VERSION@", __version__))


def _tables(layout: Layout, embedded_bytes: int | None) -> str:
    offsets, payload = layout.weight_offsets()
    weights = [s.name for s in layout.of_kind("weight")]
    rows = []
    for slot in layout.slots:
        index = weights.index(slot.name) if slot.kind == "weight" else 0
        rows.append(f"    {{SLOT_{slot.kind.upper()}, {int(slot.per_batch)}, {index}, "
                    f"{slot.bytes}u, {offsets.get(slot.name, 0)}u}}, /* {slot.name} */")
    model_bytes = sum(aligned(s.bytes) for s in layout.slots if s.kind in ("weight", "packed"))
    # each array rounded up per sample: an upper bound of the rounding of its bytes x batch
    # that fill_table does
    work_sample = sum(aligned(s.bytes) for s in layout.of_kind("work") if s.per_batch)
    work_fixed = sum(aligned(s.bytes) for s in layout.of_kind("work") if not s.per_batch)
    lines = [f"#define SLOT_COUNT {len(layout.slots)}u",
             f"#define WEIGHT_COUNT {len(weights)}u",
             f"#define PAYLOAD_BYTES {payload}u",
             f"#define MODEL_BYTES {model_bytes}u",
             f"#define WORK_FIXED_BYTES {work_fixed}u",
             f"#define WORK_SAMPLE_BYTES {max(work_sample, 1)}u",
             "static const slot_info slots[SLOT_COUNT] = {", *rows, "};"]
    if embedded_bytes is not None:
        lines += [f"#define EMBEDDED_BYTES {embedded_bytes}u",
                  f"extern const unsigned char {layout.net}__embedded_weights[];"]
    lines += [_param_table(layout)]
    return "\n".join(lines)


def _param_table(layout: Layout) -> str:
    net = layout.net
    rows = []
    for weight in layout.of_kind("weight"):
        if len(weight.shape) > MAX_RANK:
            raise ValueError(f"{weight.name} has {len(weight.shape)} dimensions; a C library "
                             f"lists at most {MAX_RANK}")
        shape = ", ".join(map(str, weight.shape)) or "0"
        rows.append(f'    {{"{weight.name}", {len(weight.shape)}, {{{shape}}}, '
                    f"{weight.elements}u}},")
    body = "\n".join(rows) or '    {"", 0, {0}, 0u},'
    return (f"{net.upper()}_API const {net}_param_info "
            f"{net}_params[{max(len(rows), 1)}] = {{\n{body}\n}};")


def _crc_table() -> str:
    """zlib's CRC-32 table (polynomial 0xEDB88320, reflected) as a C array."""
    values = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
        values.append(f"0x{crc:08x}u")
    rows = [", ".join(values[i:i + 6]) for i in range(0, 256, 6)]
    return "static const uint32_t crc_table[256] = {\n    " + ",\n    ".join(rows) + "\n};"


def _braces(shape: tuple[int, ...]) -> str:
    return "{" + ", ".join(map(str, shape)) + "}"


HEADER = """\
/* {net}.h: the network {net} as a C library, compiled by cnnc {version} from {source}.

   Link with lib{net}.a (or lib{net}.so) and the C math library (-lm). The weights are
   {net}.weights.bin beside the library, or embedded in it (cnnc compile --embed-weights).

       {net}_model *model;
       int status = {net}_init(&model, "{net}.weights.bin");
       if (status != {upper}_OK) {{ fprintf(stderr, "%s\\n", {net}_strerror(status)); ... }}
       void *work = malloc({net}_workspace_size(batch));
       status = {net}_forward(model, x, batch, y, work);
       free(work);
       {net}_free(model);

   x: batch x {upper}_INPUT_SIZE values, NCHW, each sample's {upper}_INPUT_SHAPE in C order;
   y: batch x {upper}_OUTPUT_SIZE values, as the Python module's forward returns them.
   A model is read-only after init: threads may share one, each with its own workspace.
   Nothing here allocates but init; no function exits or aborts: each returns a status. */

#ifndef {upper}_H
#define {upper}_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {{
#endif

#if defined(__GNUC__) || defined(__clang__)
#define {upper}_API __attribute__((visibility("default")))
#else
#define {upper}_API
#endif

/* the cnnc version that wrote this library */
#define {upper}_VERSION "{version}"
#define {upper}_VERSION_MAJOR {major}
#define {upper}_VERSION_MINOR {minor}
#define {upper}_VERSION_PATCH {patch}

/* the element type of inputs, outputs and weights */
#define {upper}_DTYPE "{dtype}"
typedef {scalar} {net}_scalar;

/* one sample's input and output: shapes (C order) and element counts */
#define {upper}_INPUT_RANK {in_rank}
#define {upper}_INPUT_SHAPE {in_shape}
#define {upper}_INPUT_SIZE {in_size}
#define {upper}_OUTPUT_RANK {out_rank}
#define {upper}_OUTPUT_SHAPE {out_shape}
#define {upper}_OUTPUT_SIZE {out_size}

/* The weights file: its size, and the hash of its layout (every array's name, dtype and
   shape, in order) that its header must carry. Any weights of this layout load: retrained
   ones too (cnnc compile --emit lib --weights W.npz writes them). */
#define {upper}_WEIGHTS_FILE_BYTES {file_bytes}u
#define {upper}_WEIGHTS_HASH {hash}
#define {upper}_HAS_EMBEDDED_WEIGHTS {embedded}

/* the statuses every function returns; {net}_strerror says each in words */
enum {{
{statuses}
}};

/* The arrays of the weights file, in its order (parameters, then the batch-norm running
   statistics that inference reads):
{listed}
 */
#define {upper}_PARAM_COUNT {count}
#define {upper}_MAX_RANK {max_rank}
typedef struct {{
    const char *name;
    int rank;
    int64_t shape[{upper}_MAX_RANK];
    size_t size; /* elements */
}} {net}_param_info;
extern {upper}_API const {net}_param_info {net}_params[];

typedef struct {net}_model {net}_model;

/* Load the weights from a file, or (weights_path NULL) the embedded ones. On success *out
   is a new model; on failure it is NULL and the status says why: a missing file, one
   shorter than {upper}_WEIGHTS_FILE_BYTES, another network's (its header's hash is not
   {upper}_WEIGHTS_HASH), a damaged one (CRC-32). */
{upper}_API int {net}_init({net}_model **out, const char *weights_path);

/* The same from a weights file's bytes in memory; they are copied, so `data` may be freed
   after the call. */
{upper}_API int {net}_init_from_memory({net}_model **out, const void *data, size_t size);

/* Free a model (NULL: nothing). */
{upper}_API void {net}_free({net}_model *m);

/* Bytes of one element ({upper}_DTYPE), and one sample's input and output element counts
   ({upper}_INPUT_SIZE, {upper}_OUTPUT_SIZE), for a caller that loads the library at run
   time (dlopen, WebAssembly). */
{upper}_API size_t {net}_scalar_size(void);
{upper}_API size_t {net}_input_size(void);
{upper}_API size_t {net}_output_size(void);

/* A status in words; never NULL. */
{upper}_API const char *{net}_strerror(int status);

/* Bytes of workspace a forward of `batch` samples needs, any alignment; 0 for batch < 1 or
   a size this machine cannot address. */
{upper}_API size_t {net}_workspace_size(int batch);

/* The network's output for `batch` samples: y = forward(x). Inference: batch norm with its
   running statistics, no dropout. The workspace is the caller's ({net}_workspace_size
   bytes), one per thread running at the same time; its contents need no initialising. */
{upper}_API int {net}_forward(const {net}_model *m, const {scalar} *x, int batch, {scalar} *y,
                void *workspace);

#ifdef __cplusplus
}}
#endif

#endif /* {upper}_H */
"""
