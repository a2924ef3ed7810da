"""Several object files in one module-file section: the compiler packs them, the runtime
unpacks them before it links them."""

from __future__ import annotations

import struct

OBJECTS_MAGIC = b"CNNCOBJS"


def pack_objects(objects: tuple[bytes, ...]) -> bytes:
    """Several object files as one byte string: magic, count, lengths, then the files."""
    header = OBJECTS_MAGIC + struct.pack("<I", len(objects))
    header += b"".join(struct.pack("<Q", len(obj)) for obj in objects)
    return header + b"".join(objects)


def unpack_objects(data: bytes) -> list[bytes]:
    """The object files `pack_objects` joined (ValueError where `data` is not that)."""
    if not data.startswith(OBJECTS_MAGIC) or len(data) < len(OBJECTS_MAGIC) + 4:
        raise ValueError("not a set of object files")
    (count,) = struct.unpack_from("<I", data, len(OBJECTS_MAGIC))
    offset = len(OBJECTS_MAGIC) + 4
    if count > 4096 or len(data) < offset + 8 * count:
        raise ValueError("the object file table is damaged")
    lengths = struct.unpack_from(f"<{count}Q", data, offset)
    offset += 8 * count
    if offset + sum(lengths) != len(data):
        raise ValueError("the object files do not fill the section exactly")
    objects = []
    for length in lengths:
        objects.append(data[offset:offset + length])
        offset += length
    return objects
