"""Reading weight files without running code from them, and writing safetensors atomically.

Three readers, chosen by content (not by file name):

* **PyTorch pickles** (``torch.save``, zip or legacy format): ``torch.load(weights_only=True)``.
  MAE's and the reference DeepMIM's ``save_model`` store ``'args': argparse.Namespace(...)``; that
  one class is allow-listed, for the duration of the call only, and every Namespace is returned as a
  plain ``dict`` (``ckpt['args']['lr']``), so nothing downstream holds one. Everything else those
  files hold (model / optimizer state dicts, the ``GradScaler`` state, the epoch, the flag values:
  str, int, float, bool, None, lists) is plain data that weights-only loading accepts by default.
  A file that would import and call anything else while unpickling (``posix.system`` via
  ``__reduce__``, ...) is refused with a message naming that global.
* **safetensors** (``.safetensors`` or by its header): tensors only, by construction.
* **TorchScript archives** (OpenAI ships CLIP as one): never ``torch.jit.load``, which runs the
  archive's ``__setstate__`` methods. :func:`load_torchscript_state_dict` unpickles the module tree
  of ``data.pkl`` with a restricted unpickler that only builds tensors (storages from the zip's
  ``data/`` records) and plain containers; ``__torch__.*`` module classes become inert records of
  their attributes. Which attributes are parameters and buffers comes from the ``__parameters__`` /
  ``__buffers__`` declarations in the archive's ``code/`` files, read as text. A module whose class
  defines its own ``__setstate__`` is refused: only its code could say what its state means.
"""
import argparse
import ast
import collections
import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Set, Tuple

from util.checkpoints.files import write_atomic
from util.run.errors import UserError

import torch


class UnreadableFile(UserError):
    """A file that is not a readable checkpoint (truncated, foreign); ``detail`` says what failed."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


# metadata key under which convert_checkpoint stores a checkpoint's non-tensor entries
# (epoch, args, model_cfg) in a safetensors file; load_torch puts them back beside 'model'
SAFETENSORS_EXTRA_KEY = "deepmim"

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal escape sequences (torch bolds its warnings)
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (safe to quote in a one-line error)."""
    return _ANSI.sub("", text)


def _first_line(e: BaseException) -> str:
    text = strip_ansi(str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# format detection


def is_safetensors(path: str) -> bool:
    """True for a file that starts like safetensors (little-endian u64 header size, then ``{``), whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < size < os.path.getsize(path)


def is_torchscript(path: str) -> bool:
    """True for a TorchScript archive (``torch.jit.save``): a zip with ``<name>/code/`` or ``constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(re.match(r"^[^/]+/(code/|constants\.pkl$)", n) for n in names)


# --------------------------------------------------------------------------------------------
# the one reader


def load_torch(path: str, mmap: bool = False) -> Any:
    """The object stored in a weight file, loaded without running code from it.

    PyTorch pickles go through ``torch.load(map_location='cpu', weights_only=True)`` with
    ``argparse.Namespace`` allowed (returned as ``dict``); safetensors files give their tensors (and,
    for this repo's exports, ``{'model': tensors, **extra}``); TorchScript archives give the state
    dict of :func:`load_torchscript_state_dict`.

    Args:
        path: the file.
        mmap: map the tensors of a zip-format file instead of reading them (cheap look at the
            keys of a large checkpoint); ignored for the legacy format.

    Raises:
        UserError: missing, truncated or foreign file; a pickle that would run code.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path!r} not found.")
    # by content: earlier versions of tools/convert_checkpoint.py wrote torch zips named .safetensors
    if is_safetensors(path) or (path.endswith(".safetensors") and not zipfile.is_zipfile(path)):
        return _load_safetensors(path)
    if is_torchscript(path):
        return load_torchscript_state_dict(path)
    try:
        # only the zip format can be memory-mapped (torch raises for a legacy file with mmap=True), and
        # only by name; a file object otherwise, since torch.load sends a name ending in .safetensors
        # to safetensors
        use_mmap = mmap and zipfile.is_zipfile(path) and not path.endswith(".safetensors")
        with torch.serialization.safe_globals([argparse.Namespace]), open(path, "rb") as f:
            obj = torch.load(path if use_mmap else f, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as e:  # truncated or foreign files fail in many ways (zip, index, EOF, pickle errors)
        names = _unsafe_globals(path, e) if isinstance(e, pickle.UnpicklingError) else []
        if names:
            raise UserError(_refusal(path, names)) from None
        raise UnreadableFile(
            f"{path!r} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated or "
            f"another format. Download it again, or pass a .pth / .safetensors file.", _first_line(e)
        ) from None
    return namespaces_to_dicts(obj)


def _unsafe_globals(path: str, error: BaseException) -> List[str]:
    """The globals a weights-only load refuses in ``path``, read off the pickle without running it."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy-format files, or a pickle too broken to scan
        found = []
    return found or _GLOBAL_IN_MESSAGE.findall(strip_ansi(str(error)))


def _refusal(path: str, names: List[str]) -> str:
    return (
        f"Refused to load {path!r}: unpickling it would import and call {', '.join(names)}, i.e. run code from the "
        f"file, which weights-only loading never does. Checkpoints of this repo, MAE and the reference "
        f"DeepMIM do not need that. If you trust the file, re-save its tensors where running it is "
        f"acceptable (torch.save(torch.load(f, weights_only=False)['model'], 'clean.pth')) and pass "
        f"the clean file."
    )


def namespaces_to_dicts(obj: Any) -> Any:
    """``obj`` with every ``argparse.Namespace`` inside dicts / lists / tuples replaced by a dict.

    Dicts and lists are changed in place (``obj`` was just loaded; nobody else holds it).
    """
    if isinstance(obj, argparse.Namespace):
        return {k: namespaces_to_dicts(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (argparse.Namespace, dict, list, tuple)):
                obj[k] = namespaces_to_dicts(v)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, (argparse.Namespace, dict, list, tuple)):
                obj[i] = namespaces_to_dicts(v)
    elif isinstance(obj, tuple) and any(isinstance(v, (argparse.Namespace, dict, list, tuple)) for v in obj):
        items = [namespaces_to_dicts(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)  # keep named tuples
    return obj


# --------------------------------------------------------------------------------------------
# safetensors


def _load_safetensors(path: str) -> Any:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise UnreadableFile(f"{path!r} is not a readable safetensors file ({_first_line(e)}).", _first_line(e)) from None
    extra = meta.get(SAFETENSORS_EXTRA_KEY)
    if extra is None:
        return tensors
    try:
        extra = json.loads(extra)
    except ValueError:
        raise UserError(f"{path!r}: its {SAFETENSORS_EXTRA_KEY!r} metadata is not valid JSON.") from None
    return {"model": tensors, **extra}


def save_safetensors(tensors: Dict[str, torch.Tensor], path: Path, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write ``tensors`` as a real safetensors file (atomically).

    Tensors that share memory (tied weights, views) are written as separate copies: the format
    holds each tensor's own bytes. ``extra`` (plain, JSON-serializable values such as ``epoch``,
    ``args``, ``model_cfg``) goes into the metadata; :func:`load_torch` returns it beside ``'model'``.
    """
    from safetensors.torch import save

    seen: Set[Tuple[int, int]] = set()
    flat = {}
    for k, v in tensors.items():
        if not torch.is_tensor(v):
            raise UserError(f"Cannot write {k!r} ({type(v).__name__}) to safetensors: tensors only.")
        v = v.detach().cpu()
        span = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes()) if v.numel() else (0, 0)
        shared = v.numel() and span in seen
        seen.add(span)
        flat[k] = v.clone() if shared or not v.is_contiguous() else v
    metadata = {"format": "pt"}  # what timm / transformers expect of a PyTorch safetensors file
    if extra:
        metadata[SAFETENSORS_EXTRA_KEY] = json.dumps(extra, default=str)
    data = save(flat, metadata=metadata)
    write_atomic(Path(path), lambda f: f.write(data))


# --------------------------------------------------------------------------------------------
# TorchScript archives, read without torch.jit

# the storage classes a TorchScript pickle names, and their element types
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class _StorageType:
    """What ``GLOBAL torch FloatStorage`` unpickles to here: a dtype, not the class."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _Storage:
    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped, self.dtype = untyped, dtype


class _ScriptObject:
    """An inert stand-in for an instance of a ``__torch__.*`` class.

    Pickle's BUILD hands it the recorded attributes; nothing of the archive's class ever runs.
    """

    qualname = ""

    def __init__(self, *args: Any) -> None:  # a REDUCE on the class: keep the arguments, do nothing
        self.state: Any = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``'s effect, with every argument checked: a view of ``storage``."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not an archive record")
    if not (isinstance(offset, int) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(isinstance(s, int) and s >= 0 for s in (*size, *stride))):
        raise pickle.UnpicklingError("a tensor with a malformed offset / size / stride")
    numel = storage.untyped.nbytes() // torch.empty((), dtype=storage.dtype).element_size()
    extent = 0 if 0 in size else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > numel:
        raise pickle.UnpicklingError(f"a tensor reaching past its storage ({extent} > {numel} elements)")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage.untyped, offset, tuple(size), tuple(stride))


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:  # TorchScript tags typed lists / dicts
    return value


# (module, name) -> what the restricted unpickler hands out; nothing else is importable
_TS_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    **{("torch.jit._pickle", f"build_{kind}list"): list for kind in ("int", "double", "bool", "tensor", "")},
}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: tensors from the zip's records, plain containers, inert ``__torch__`` objects."""

    def __init__(self, file: BinaryIO, zf: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.zf, self.prefix = zf, prefix
        self.storages: Dict[str, _Storage] = {}  # one storage per record: shared tensors stay shared
        self.classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _TS_GLOBALS:
            return _TS_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType) or not (isinstance(key, str) and re.fullmatch(r"\w+", key)):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r:.80}")
        if key not in self.storages:
            record = f"{self.prefix}data/{key}"
            try:
                info = self.zf.getinfo(record)
            except KeyError:
                raise pickle.UnpicklingError(f"the archive lacks the record {record}") from None
            self.storages[key] = _Storage(_read_record(self.zf, info), storage_type.dtype)
        return self.storages[key]


def _read_record(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> torch.UntypedStorage:
    """A zip member's bytes, read once, straight into the storage the tensors will view.

    Records are stored uncompressed (as torch writes them): those are read from their offset,
    without zipfile's CRC pass; the buffer is not zero-filled first (both halve the time).
    """
    data = torch.empty(info.file_size, dtype=torch.uint8)
    buf = data.numpy()  # a writable buffer over the tensor's memory
    if info.compress_type == zipfile.ZIP_STORED and zf.fp is not None:
        zf.fp.seek(info.header_offset)
        header = zf.fp.read(zipfile.sizeFileHeader)
        if len(header) != zipfile.sizeFileHeader or header[:4] != zipfile.stringFileHeader:
            raise pickle.UnpicklingError(f"the record {info.filename} has a damaged zip header")
        fields = struct.unpack(zipfile.structFileHeader, header)
        zf.fp.seek(fields[zipfile._FH_FILENAME_LENGTH] + fields[zipfile._FH_EXTRA_FIELD_LENGTH], os.SEEK_CUR)
        got = zf.fp.readinto(buf)
    else:
        with zf.open(info) as f:
            got = f.readinto(buf)
    if got != info.file_size:
        raise pickle.UnpicklingError(f"the record {info.filename} is truncated")
    return data.untyped_storage()


def _archive_prefix(zf: zipfile.ZipFile, path: str) -> str:
    pickles = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pickles) != 1:
        raise UserError(f"{path!r} is not a TorchScript archive with one module (found {len(pickles)} data.pkl).")
    return pickles[0][: -len("data.pkl")]


_CLASS_HEADER = re.compile(r"^class (\w+)\((\w*)\):", re.M)
_DECL = re.compile(r"^  (__parameters__|__buffers__) = (\[.*?\])\s*$", re.M)


class _ClassInfo:
    def __init__(self, is_module: bool, params: List[str], buffers: List[str], custom_state: bool) -> None:
        self.is_module, self.params, self.buffers, self.custom_state = is_module, params, buffers, custom_state


def _class_declarations(zf: zipfile.ZipFile, prefix: str) -> Dict[str, _ClassInfo]:
    """Qualified class name -> its declarations, from the ``code/`` files read as text (never run).

    ``code/__torch__/a/b.py`` declares the classes of module ``__torch__.a.b``.
    """
    out: Dict[str, _ClassInfo] = {}
    code = f"{prefix}code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code): -len(".py")].replace("/", ".")
        text = zf.read(name).decode("utf-8", errors="replace")
        headers = list(_CLASS_HEADER.finditer(text))
        for i, m in enumerate(headers):
            body = text[m.end(): headers[i + 1].start() if i + 1 < len(headers) else len(text)]
            decls = {k: ast.literal_eval(v) for k, v in _DECL.findall(body)}  # literals only, nothing evaluated
            out[f"{module}.{m.group(1)}"] = _ClassInfo(
                m.group(2) == "Module", list(decls.get("__parameters__", [])), list(decls.get("__buffers__", [])),
                bool(re.search(r"^  def __setstate__\(", body, re.M)),
            )
    return out


def _collect(obj: _ScriptObject, prefix: str, classes: Dict[str, _ClassInfo], out: Dict[str, torch.Tensor],
             path: str) -> None:
    """Parameters, then buffers, then submodules (recursively), each in attribute order: the order
    of ``nn.Module.state_dict`` on the loaded module."""
    info = classes.get(obj.qualname)
    if info is None:
        raise UserError(f"{path!r}: the archive does not declare its class {obj.qualname}; it may be damaged.")
    if info.custom_state or not isinstance(obj.state, dict):
        raise UserError(
            f"{path!r}: module {prefix.rstrip('.') or '(root)'} ({obj.qualname}) restores its state with its "
            f"own __setstate__ code, which loading would have to run; refusing. If you trust the file, "
            f"re-save its weights as a state dict (torch.save(model.state_dict(), 'weights.pth'))."
        )
    state: Dict[str, Any] = obj.state
    for names in (set(info.params), set(info.buffers)):
        for k, v in state.items():
            if k in names and torch.is_tensor(v):  # a None parameter (Linear without bias) is left out
                out[prefix + k] = v
    for k, v in state.items():
        if isinstance(v, _ScriptObject) and classes.get(v.qualname, _ClassInfo(False, [], [], False)).is_module:
            _collect(v, f"{prefix}{k}.", classes, out, path)


def load_torchscript_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, equal to ``torch.jit.load(path).state_dict()``,
    read without running anything from the file (see the module docstring).

    Raises:
        UserError: not an archive, damaged, or a module with its own ``__setstate__``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path!r} not found.")
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf, path)
            if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() != b"little":
                raise UserError(f"{path!r} was written on a big-endian machine; re-save it on a little-endian one.")
            classes = _class_declarations(zf, prefix)
            with zf.open(f"{prefix}data.pkl") as f:
                root = _TorchScriptUnpickler(f, zf, prefix).load()
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        raise UserError(
            f"Refused to read {path!r} as TorchScript weights: its data.pkl holds {_first_line(e)}; only "
            f"tensors, plain values and module records are read from such archives."
        ) from None
    except Exception as e:  # truncated zips, bad pickles
        raise UnreadableFile(f"{path!r} is not a readable TorchScript archive ({_first_line(e)}); it may be truncated.",
                             _first_line(e)) from None
    if not isinstance(root, _ScriptObject):
        raise UserError(f"{path!r}: the archive's data.pkl does not hold a module.")
    out: Dict[str, torch.Tensor] = {}
    _collect(root, "", classes, out, path)
    return out
