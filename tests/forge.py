"""Forging module files: edit a `.cnnm`'s manifest or sections and compute every hash again
(section hashes, the code hash, the header's manifest hash), as anyone who edits a file can.
What is left to refuse a forgery is then only what loading checks about its meaning."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

from cnnc.artifact import format as artifact

HEADER = struct.Struct("<8sIQ32s")


def unpacked(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the sections of a valid module file's bytes."""
    _, _, length, _ = HEADER.unpack_from(data)
    manifest = json.loads(data[HEADER.size:HEADER.size + length])
    start = HEADER.size + length
    sections = {name: data[start + where["offset"]:start + where["offset"] + where["length"]]
                for name, where in manifest["sections"].items()}
    return manifest, sections


def forge(data: bytes, edit: Callable[[dict[str, Any]], Any] | None = None,
          sections: dict[str, bytes | None] | None = None) -> bytes:
    """`data` with `sections` replaced (None removes one), then the manifest edited in place
    by `edit` (what it returns is ignored), and every hash made to match.

    The section table is written before `edit` runs, so an edit of manifest["sections"]
    (a length, an offset) stays in the file; the code hash is computed after it."""
    manifest, blobs = unpacked(data)
    for name, blob in (sections or {}).items():
        if blob is None:
            blobs.pop(name, None)
        else:
            blobs[name] = blob
    body, table = b"", {}
    for name, blob in blobs.items():
        table[name] = {"offset": len(body), "length": len(blob),
                       "sha256": hashlib.sha256(blob).hexdigest()}
        body += blob
    manifest["sections"] = table
    if edit is not None:
        edit(manifest)
    code = blobs.get(artifact.code_section(manifest), b"")
    manifest["code_sha256"] = artifact.code_hash(code, manifest, blobs.get("program", b""))
    return packed(json.dumps(manifest, indent=1).encode("utf-8"), body)


def packed(text: bytes, body: bytes) -> bytes:
    """A header for the manifest `text` (its real hash), the manifest, then `body`."""
    header = HEADER.pack(artifact.MAGIC, artifact.FORMAT_VERSION, len(text),
                         hashlib.sha256(text).digest())
    return header + text + body


def rewrite(data: bytes, edit: Callable[[dict[str, Any]], Any]) -> bytes:
    """The file with its manifest edited and only its header checksum made to match again:
    damage (the code hash and the section table are as they were), not a forgery."""
    manifest = json.loads(_manifest_text(data))
    edit(manifest)
    return rewrite_text(data, json.dumps(manifest).encode())


def rewrite_text(data: bytes, text: bytes) -> bytes:
    """The file with its manifest replaced by `text` and a matching header checksum."""
    return packed(text, data[HEADER.size + len(_manifest_text(data)):])


def _manifest_text(data: bytes) -> bytes:
    _, _, length, _ = HEADER.unpack_from(data)
    return data[HEADER.size:HEADER.size + length]
