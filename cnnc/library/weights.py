"""The weights file of a C library (`NET.weights.bin`), little-endian:

    offset  size  field
    0       8     magic "CNNCWTS\\0"
    8       4     format version (1)
    12      4     number of arrays
    16      8     the layout's hash (which network's weights these are: layout.weights_hash)
    24      8     payload bytes
    32      4     CRC-32 of the payload (zlib's, as in gzip and PNG): damage
    36      28    zero
    64      ...   the arrays in the layout's order, each at a 64-byte aligned offset of the
                  payload, zero padding between them

The library checks each field before it copies anything (the C side: model.c.in)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"CNNCWTS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQQI28x")  # 64 bytes
ALIGNMENT = 64
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits, of a few hundred bytes (the layout's text): the C library has the
    value as a constant."""
    value = FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


def weights_bytes(arrays: list[np.ndarray], offsets: list[int], payload_size: int,
                  layout_hash: int) -> bytes:
    """The file's bytes for `arrays` (of the layout's dtypes and shapes, in order) at their
    payload `offsets` (`Layout.weight_offsets`, which the C library's tables also give)."""
    payload = bytearray(payload_size)  # zeros between the arrays
    for array, offset in zip(arrays, offsets, strict=True):
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        payload[offset:offset + len(data)] = data
    header = HEADER.pack(MAGIC, VERSION, len(arrays), layout_hash, payload_size,
                         zlib.crc32(payload))
    return header + bytes(payload)
