"""A GGUF file's header, metadata and tensor table, read quickly and checked, for `--weights gguf`.

gguf's own `GGUFReader` builds a numpy view for every part of every metadata value: the
embedded model's 49152-token vocabulary and 48900 merges alone took 2.7 s of a cold start.
This reader takes the same header apart with `struct` in one pass (~0.1 s) and maps the file
once. Every length and offset is checked against the file's size before it is used, because the
C kernels will later read these bytes without checking anything:

    magic "GGUF", version (2 or 3), tensor count, metadata count
    metadata: key (u64 length + UTF-8), value type (u32), value   (arrays: type, u64 count, items)
    tensor table: name, dims (u32 count + u64 each, fastest first), ggml type (u32), offset (u64)
    padding to `general.alignment` (32 by default), then the tensor data

`GGUFFile` answers what the loader's `gguf_config` asks of a reader (`fields[key].contents()`,
`tensors` with `name`, `tensor_type`, `shape`, `data`), so the same function reads both.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import UntrustedPath, fd_path, open_regular
from ..loader.errors import ModelLoadError

MAGIC = b"GGUF"
MAX_DIMS = 4
# value type → (struct format, size) for the fixed-size ones
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
           6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
STRING, ARRAY = 8, 9


class GGUFFormatError(ModelLoadError):
    """The file is not a GGUF this reader can trust; the message says where it went wrong."""


@dataclass(frozen=True)
class Field:
    """One metadata value; `contents()` and `data` as gguf's ReaderField offers them."""
    value: Any

    def contents(self) -> Any:
        return self.value.decoded() if isinstance(self.value, Strings) else self.value

    @property
    def data(self) -> Any:
        return self.value


class Strings:
    """A metadata array of strings, decoded only when asked for: the vocabulary and merges are
    ~100k strings (~15 MB as Python objects) that a load which finds its tokenizer elsewhere
    never needs — counting them is enough for the model's shape."""

    def __init__(self, buf: memoryview, offsets: array, path: Path):
        self._buf, self._offsets, self._path = buf, offsets, path     # (start of each length)
        self._list: list[str] | None = None

    def decoded(self) -> list[str]:
        """All the strings, decoded once (the config and the tokenizer both ask)."""
        if self._list is None:
            self._list = list(self)
        return self._list

    def __len__(self) -> int:
        return len(self._offsets)

    def __iter__(self):
        buf = self._buf
        for at in self._offsets:
            n = struct.unpack_from("<Q", buf, at)[0]
            try:
                yield bytes(buf[at + 8:at + 8 + n]).decode("utf-8")
            except UnicodeDecodeError:
                raise GGUFFormatError(f"{self._path.name}: a metadata string is not UTF-8") \
                    from None

    def __getitem__(self, i):
        return list(self)[i]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: Any              # gguf.GGMLQuantizationType
    shape: np.ndarray             # GGUF order: fastest dimension first (columns, rows)
    data: np.ndarray              # uint8 view of the tensor's bytes in the memory map


class GGUFFile:
    """Parse `path`'s header and map its data. Raises GGUFFormatError on anything inconsistent."""

    def __init__(self, path: str | Path):
        import gguf
        self.path = Path(path)
        try:
            fd = open_regular(self.path)       # a regular file (not a FIFO), mapped through
        except UntrustedPath as exc:           # the very descriptor that was checked
            raise GGUFFormatError(str(exc)) from None
        try:
            # Copy-on-write: the weights may be rearranged for the kernels (GGUFMatrix); such
            # pages become this process's own, the file is never written.
            self.map = np.memmap(fd_path(fd, self.path), dtype=np.uint8, mode="c")
        except (OSError, ValueError) as exc:
            raise GGUFFormatError(f"cannot map {self.path.name}: {exc}") from None
        finally:
            os.close(fd)                       # the map keeps its own reference
        self.size = len(self.map)
        self.buf = memoryview(self.map)
        self.pos = 0
        if self._bytes(4) != MAGIC:
            raise GGUFFormatError(f"{self.path.name} is not a GGUF file (no GGUF magic)")
        version = self._scalar(4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path.name}: GGUF version {version} is not supported "
                                  f"(2 and 3 are)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        # Every entry takes at least 8 bytes: a count larger than the file is a lie.
        if n_tensors > self.size // 8 or n_kv > self.size // 8:
            raise GGUFFormatError(f"{self.path.name}: header claims {n_tensors} tensors and "
                                  f"{n_kv} metadata entries in {self.size} bytes")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = Field(self._value(self._scalar(4), key))
        table = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} has {n_dims} dims")
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            table.append((name, dims, self._scalar(4), self._scalar(10)))
        alignment = self.fields.get("general.alignment", Field(32)).value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path.name}: bad general.alignment {alignment!r}")
        start = -(-self.pos // alignment) * alignment
        self.data_start = start
        self.tensors: list[Tensor] = []
        for name, dims, ggml_type, offset in table:
            try:
                qtype = gguf.GGMLQuantizationType(ggml_type)
                per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} has unknown type "
                                      f"{ggml_type}") from None
            n = int(np.prod(dims, dtype=object))
            if dims[0] % per_block:
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} rows of {dims[0]} "
                                      f"are not whole {qtype.name} blocks")
            nbytes = n // per_block * block_bytes
            begin = start + offset
            if offset % alignment or begin + nbytes > self.size:
                raise GGUFFormatError(f"{self.path.name}: tensor {name!r} lies outside the file "
                                      f"(truncated?)")
            self.tensors.append(Tensor(name, qtype, np.array(dims, dtype=np.uint64),
                                       self.map[begin:begin + nbytes]))

    def release_header(self) -> None:
        """Let this process's memory drop the pages of the header and metadata (for the embedded
        model 1.8 MB, mostly the vocabulary) once the tokenizer has been built from them: they
        are read from the file again if asked for. Only whole pages before the first tensor's —
        pages that are never rearranged (GGUFMatrix), so nothing of ours is lost."""
        end = self.data_start // mmap.PAGESIZE * mmap.PAGESIZE
        mapping = getattr(self.map, "_mmap", None)
        if end and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                mapping.madvise(mmap.MADV_DONTNEED, 0, end)
            except (OSError, ValueError):      # an advice, not a requirement
                pass

    # ------------------------------------------------------------------ bounded reads
    def _bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path.name} ends in the middle of its header "
                                  f"(truncated?)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def _scalar(self, vtype: int):
        fmt, size = SCALARS[vtype]
        if self.pos + size > self.size:
            raise GGUFFormatError(f"{self.path.name} ends in the middle of its header "
                                  f"(truncated?)")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        try:
            return self._bytes(n).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self.path.name}: a metadata string is not UTF-8") from None

    def _value(self, vtype: int, key: str):
        if vtype in SCALARS:
            return self._scalar(vtype)
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            item, count = self._scalar(4), self._scalar(10)
            if count > self.size - self.pos:          # every item takes at least one byte
                raise GGUFFormatError(f"{self.path.name}: {key} claims {count} items")
            if item in SCALARS:                       # one unpack for the whole run
                fmt, size = SCALARS[item]
                end = self.pos + size * count
                if end > self.size:
                    raise GGUFFormatError(f"{self.path.name} ends inside {key} (truncated?)")
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos = end
                return values
            if item == STRING:                        # checked now, decoded when asked
                offsets = array("q")                  # 8 bytes each, not a Python int
                for _ in range(count):
                    offsets.append(self.pos)
                    n = self._scalar(10)
                    if n > self.size - self.pos:
                        raise GGUFFormatError(f"{self.path.name} ends inside {key} (truncated?)")
                    self.pos += n
                return Strings(self.buf, offsets, self.path)
            raise GGUFFormatError(f"{self.path.name}: {key} is an array of type {item}, "
                                  f"which this reader does not read")
        raise GGUFFormatError(f"{self.path.name}: {key} has unknown value type {vtype}")
