"""Hand-made .npy headers and zip archives, shared by the .npz reader and runtime tests."""

from __future__ import annotations

import io
import struct
import zipfile


def npy_header(shape: tuple[int, ...], descr: str = "|u1", version: int = 1) -> bytes:
    """A .npy header written by hand, so it can claim anything."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    length = struct.pack("<H" if version == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + length + text


def zip_of(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()
