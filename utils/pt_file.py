"""Torch ``.pt`` files that every reader accepts, byte for byte the same whatever torch is installed.

A1111 checks every ``.pt`` before loading it (its default "safe unpickle" check): the zip may hold only
``<folder>/data.pkl``, ``<folder>/version``, ``<folder>/byteorder``, ``<folder>/.data/serialization_id`` and
``<folder>/data/<n>``, and the pickle may name only a few globals (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage`` and the other legacy storage classes). ``torch.save`` of
recent releases adds ``.format_version`` and ``.storage_alignment`` records, which A1111 refuses, and names the
folder after the file (our temporary file, with :func:`utils.fileio.atomic_path`).

So this module writes the zip itself, in the layout torch has read since 1.6: ``archive/data.pkl`` (pickle
protocol 2, tensors as ``_rebuild_tensor_v2`` of a persistent ``('storage', torch.<Type>Storage, key, 'cpu', numel)``
reference), ``archive/byteorder``, ``archive/data/<key>`` (raw tensor bytes, 64-byte aligned like torch's own files),
``archive/version``. Nothing depends on the installed torch's serializer, the clock or randomness: the same object
gives the same bytes, hence the same A1111 hash.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import torch

from utils.fileio import atomic_path

ARCHIVE = "archive"  # the folder name torch itself uses when saving to a buffer
ZIP_FORMAT_VERSION = b"3\n"  # the zip serialization version torch writes and reads (since 1.6)
ALIGNMENT = 64  # torch aligns tensor data in its zip files so they can be memory-mapped
_PADDING_FIELD = 0x4246  # "FB": the extra-field id torch pads local headers with
_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: the bytes must not depend on when the file was written

# The storage classes A1111's check allows, by dtype (its list: Float, Half, Int, Long, Double, Byte, BFloat16).
STORAGE_CLASSES = {
    torch.float32: "FloatStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.float64: "DoubleStorage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.uint8: "ByteStorage",
}


class _StorageRef:
    """Stands for one tensor's bytes in the pickle; written as the record ``data/<key>``."""

    __slots__ = ("key", "tensor")

    def __init__(self, key: str, tensor: torch.Tensor):
        self.key = key
        self.tensor = tensor


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _Pickler(pickle.Pickler):
    """Pickles tensors as torch's loader expects them, collecting their bytes as separate records."""

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[_StorageRef] = []

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            t = obj.tensor
            return ("storage", getattr(torch, STORAGE_CLASSES[t.dtype]), obj.key, "cpu", t.numel())
        return None

    def reducer_override(self, obj):
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        t = obj.detach().to("cpu")
        if t.dtype not in STORAGE_CLASSES or t.is_sparse or t.is_quantized:
            raise TypeError(f"cannot write a {t.dtype} tensor to a .pt file A1111 accepts "
                            f"(allowed: {', '.join(str(d) for d in STORAGE_CLASSES)})")
        t = t.contiguous()
        ref = _StorageRef(str(len(self.storages)), t)
        self.storages.append(ref)
        shape = tuple(t.shape)
        # (storage, offset, size, stride, requires_grad, backward_hooks): what torch pickles for a plain tensor.
        return torch._utils._rebuild_tensor_v2, (ref, 0, shape, _contiguous_strides(shape), False,
                                                 collections.OrderedDict())


def _tensor_bytes(t: torch.Tensor):
    # A zero-copy uint8 view of the elements (any dtype, 0-d included) in native byte order.
    return t.reshape(-1).view(torch.uint8).numpy()


def _add_record(zf: zipfile.ZipFile, name: str, data) -> None:
    info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 0  # the same bytes on every platform
    info.external_attr = 0
    # Pad the local header so the record's data starts on an ALIGNMENT boundary (30 = fixed local header size,
    # 4 = the padding field's own header).
    data_start = zf.fp.tell() + 30 + len(info.filename.encode("ascii")) + 4
    padding = -data_start % ALIGNMENT
    info.extra = struct.pack("<HH", _PADDING_FIELD, padding) + b"Z" * padding
    zf.writestr(info, data)


def write_pt(obj, file) -> None:
    """Write ``obj`` (dicts, lists, tuples, OrderedDicts, strings, numbers, None and CPU/GPU tensors) to a binary,
    seekable file object."""
    pickled = io.BytesIO()
    pickler = _Pickler(pickled)
    pickler.dump(obj)
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        # data.pkl first: torch's reader takes the folder name from the first record.
        _add_record(zf, "data.pkl", pickled.getvalue())
        _add_record(zf, "byteorder", sys.byteorder.encode("ascii"))
        for ref in pickler.storages:
            _add_record(zf, f"data/{ref.key}", _tensor_bytes(ref.tensor))
        _add_record(zf, "version", ZIP_FORMAT_VERSION)


def save_pt(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as a torch ``.pt`` file atomically (temporary file, then rename); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write_pt(obj, f)
    return Path(path)
