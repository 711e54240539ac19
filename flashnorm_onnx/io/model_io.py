"""Load a model safely, and write the output atomically without touching the input's files.

Loading checks what a user can get wrong before anything else runs: the path, an empty or
non-ONNX file, a truncated file, a cycle or a value written twice, sparse tensors (onnx-ir
cannot carry them), external data (of initializers, attributes, functions, training_info) that
is missing, too short, not a regular file, or points outside the model's folder. The model is
loaded with onnx-ir, which memory-maps external data: tensors are read only when needed.

Writing goes to a hidden staging folder next to the destination; :mod:`flashnorm_onnx.io.publish`
makes it visible with one commit point (the model file, renamed last, names a data file no
existing model references). Output paths are checked before any work: never the input or its
data, never a path that is not a regular file, never a report over another file of the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from pathlib import Path
from typing import Callable, NoReturn

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from flashnorm_onnx.io import publish
from flashnorm_onnx.io.walk import all_tensors, attribute_tensors
from flashnorm_onnx.errors import InputModelError, OutputPathError, first_line
from flashnorm_onnx.io.proto_checks import first_bad_arity, first_graph_problem, first_sparse_tensor, first_undecodable_name
from flashnorm_onnx.io.publish import StagedOutput

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
#: Write external data when the model's tensors exceed this, even if the input had none.
EXTERNAL_DATA_THRESHOLD = 1 << 30


@dataclasses.dataclass
class InputInfo:
    path: Path
    data_files: set[Path]
    """External data files the model references (resolved)."""
    proto_bytes: int
    tensor_bytes: int
    """Bytes of all initializers, inline or external."""
    proto: onnx.ModelProto | None = dataclasses.field(default=None, repr=False, compare=False)
    """The parsed model (without external data), handed to :func:`load` so the file is parsed once."""
    dropped: list[str] = dataclasses.field(default_factory=list)
    """Parts of the input the output will not carry (onnx-ir does not keep them), one phrase
    each, e.g. ``"training_info (2 entries)"``: for the report."""

    @property
    def has_external_data(self) -> bool:
        return bool(self.data_files)

    @property
    def total_bytes(self) -> int:
        return self.proto_bytes + sum(f.stat().st_size for f in self.data_files)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model file, or a folder holding exactly one ``model.onnx`` / ``*.onnx``."""
    p = Path(path)
    if not p.exists():
        raise InputModelError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "model.onnx").is_file():
            return p / "model.onnx"
        candidates = sorted(p.glob("*.onnx"))
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise InputModelError(f"{p}: folder holds no .onnx model")
        raise InputModelError(f"{p}: folder holds several .onnx models; name one")
    return p


def check_input(path: str | os.PathLike) -> InputInfo:
    """Validate a model file and its external data without loading tensor data."""
    p = resolve_model_path(path)
    size = _check_model_file(p)
    proto = _parse_model(p)
    _check_model_proto(p, proto)
    dropped = _dropped_parts(proto)
    data_files, tensor_bytes = _check_tensors(p, proto)
    return InputInfo(path=p, data_files=data_files, proto_bytes=size, tensor_bytes=tensor_bytes, proto=proto,
                     dropped=dropped)


def _check_model_file(p: Path) -> int:
    """The model path is a regular, non-empty file under the protobuf limit: its size."""
    if not p.is_file():
        raise InputModelError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise InputModelError(f"{p}: file is empty")
    if size > PROTOBUF_LIMIT:
        raise InputModelError(
            f"{p}: {size / 2**30:.1f} GB in one protobuf file is over the 2 GB protobuf limit; "
            "ONNX models this large must keep their tensors in external data"
        )
    return size


def _parse_model(p: Path) -> onnx.ModelProto:
    """The model file parsed as ONNX (without its external data)."""
    try:
        return onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise InputModelError(f"{p}: not a valid ONNX model ({first_line(e)})") from e
    except Exception as e:  # protobuf's C++ parser raises other types for garbage
        raise InputModelError(f"{p}: not a valid ONNX model ({first_line(e)})") from e


def _check_model_proto(p: Path, proto: onnx.ModelProto) -> None:
    """The parsed model is whole and well formed: a graph, IR version, opset and outputs; names
    that are UTF-8; node arities and attributes its schemas allow; no sparse tensor; no value
    written twice and no cycle."""
    if not proto.HasField("graph") or proto.ir_version <= 0 or len(proto.opset_import) == 0:
        raise InputModelError(f"{p}: not a valid ONNX model (no graph, IR version or opset; truncated?)")
    if len(proto.graph.output) == 0:
        raise InputModelError(f"{p}: the graph has no outputs (truncated file?)")
    bad_name = first_undecodable_name(proto)
    if bad_name is not None:
        raise InputModelError(f"{p}: not a valid ONNX model ({bad_name} is not valid UTF-8; corrupt file?)")
    bad_node = first_bad_arity(proto)
    if bad_node is not None:
        raise InputModelError(f"{p}: not a valid ONNX model ({bad_node}; corrupt file?)")
    problem = first_sparse_tensor(proto) or first_graph_problem(proto)
    if problem is not None:
        raise InputModelError(f"{p}: {problem}")


def _dropped_parts(proto: onnx.ModelProto) -> list[str]:
    """What of the input the output will not carry (see :attr:`InputInfo.dropped`)."""
    return [f"training_info ({len(proto.training_info)} entr{'y' if len(proto.training_info) == 1 else 'ies'})"
            ] if len(proto.training_info) else []


def _check_tensors(p: Path, proto: onnx.ModelProto) -> tuple[set[Path], int]:
    """Every tensor's shape against its data, inline or external: the external data files
    (resolved) and the bytes of all tensors."""
    base = p.parent.resolve()
    data_files: set[Path] = set()
    tensor_bytes = 0
    file_sizes: dict[Path, int] = {}
    for tensor in all_tensors(proto):
        if any(d < 0 for d in tensor.dims):
            raise InputModelError(f"{p}: tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        expected = _expected_bytes(tensor) if _fixed_size(tensor) else None
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            tensor_bytes += _check_inline_tensor(p, tensor, expected)
            continue
        target, length = _check_external_tensor(p, tensor, expected, base, file_sizes)
        tensor_bytes += length
        data_files.add(target)
    return data_files, tensor_bytes


def _check_inline_tensor(p: Path, tensor: onnx.TensorProto, expected: int | None) -> int:
    """A tensor stored in the model file holds the data its shape needs: its bytes."""
    if _element_count(tensor) > 0 and not _holds_data(tensor):
        raise InputModelError(
            f"{p}: tensor '{tensor.name}' declares shape {list(tensor.dims)} but holds no data"
        )
    if expected is not None and tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
        raise InputModelError(
            f"{p}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes but its shape "
            f"{list(tensor.dims)} needs {expected} (corrupt or truncated file?)"
        )
    return len(tensor.raw_data) or _typed_bytes(tensor)


def _check_external_tensor(p: Path, tensor: onnx.TensorProto, expected: int | None, base: Path,
                           file_sizes: dict[Path, int]) -> tuple[Path, int]:
    """A tensor in external data: its range fits its shape, its location is a regular file in
    the model's folder, and the file holds the range. The file (resolved) and the range's bytes;
    ``file_sizes`` caches the sizes of the files seen."""
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = _external_range(p, tensor, info, expected)
    location = _external_location(p, tensor, info)
    target = _external_file(p, tensor, location, base, file_sizes)
    if offset + length > file_sizes[target]:
        raise InputModelError(
            f"{p}: external data file '{location}' is shorter than declared "
            f"(tensor '{tensor.name}' needs bytes {offset}..{offset + length}, file has {file_sizes[target]})"
        )
    return target, length


def _external_range(p: Path, tensor: onnx.TensorProto, info: dict[str, str], expected: int | None) -> tuple[int, int]:
    """The external data's offset and length, which must be the bytes the shape needs."""
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", expected if expected is not None else _expected_bytes(tensor)))
    except ValueError:
        raise InputModelError(
            f"{p}: tensor '{tensor.name}' has a malformed external data offset or length"
        ) from None
    if offset < 0 or length < 0 or (expected is not None and length != expected):
        raise InputModelError(
            f"{p}: tensor '{tensor.name}' declares {length} bytes of external data at offset {offset}, "
            f"but its shape {list(tensor.dims)} needs {expected}"
        )
    return offset, length


def _external_location(p: Path, tensor: onnx.TensorProto, info: dict[str, str]) -> str:
    """The external data's location: present, and without a NUL character."""
    location = info.get("location", "")
    if not location:
        raise InputModelError(f"{p}: tensor '{tensor.name}' has external data with no location")
    if "\x00" in location:
        raise InputModelError(
            f"{p}: tensor '{tensor.name}' has an external data location with a NUL character "
            f"({location!r}); corrupt file?"
        )
    return location


def _external_file(p: Path, tensor: onnx.TensorProto, location: str, base: Path,
                   file_sizes: dict[Path, int]) -> Path:
    """The external data file ``location`` names (resolved): inside the model's folder and a
    regular file; its size goes into ``file_sizes``. A path the system cannot use is refused."""
    try:
        target = (base / location).resolve()
        if os.path.isabs(location) or (base != target and base not in target.parents):
            _refuse_outside(p, tensor, location, base, target)
        if target not in file_sizes:
            file_sizes[target] = _data_file_size(p, location, target)
    except (OSError, ValueError) as e:  # a name too long, a loop of links...
        raise InputModelError(
            f"{p}: tensor '{tensor.name}' has an unusable external data location {location[:100]!r} ({first_line(e)})"
        ) from None
    return target


def _refuse_outside(p: Path, tensor: onnx.TensorProto, location: str, base: Path, target: Path) -> NoReturn:
    """Refuse an external data location outside the model's folder, naming the symlink that
    leads out when there is one."""
    link = None if os.path.isabs(location) else _link_leaving(base, location)
    if link is not None:
        # e.g. a Hugging Face cache snapshot: snapshots/<hash>/model.onnx.data -> ../../blobs/<sha>
        what = (f"external data file '{location}' is a symlink" if link == os.path.normpath(location)
                else f"external data file '{location}' goes through the symlink '{link}',")
        raise InputModelError(
            f"{p}: {what} pointing outside the model's folder (to {target}), which ONNX loaders "
            f"refuse; copy the folder with links resolved (cp -rL {p.parent} DST) and optimize the copy"
        )
    raise InputModelError(
        f"{p}: tensor '{tensor.name}' points outside the model's folder ({location}); refusing"
    )


def _data_file_size(p: Path, location: str, target: Path) -> int:
    """The size of the external data file ``target``, which must exist and be a regular file."""
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise InputModelError(f"{p}: external data file '{location}' is missing") from None
    if stat.S_ISDIR(mode):
        raise InputModelError(f"{p}: external data location '{location}' is a directory, "
                              "not a regular file")
    if not stat.S_ISREG(mode):
        raise InputModelError(f"{p}: external data location '{location}' is {file_kind(mode)}, "
                              "not a regular file")
    return target.stat().st_size


def check_dims(dims: dict[str, int] | None) -> None:
    """Sizes given for symbolic input dimensions (``--dim``, ``dims=``) must be at least 1: a 0
    makes empty inputs, and a verification that compares empty tensors proves nothing."""
    for name, value in (dims or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"dims: {name}={value!r}: a dimension must be an integer of at least 1")


def load(info: InputInfo) -> ir.Model:
    """The checked model as onnx-ir (external tensors memory-mapped, read only when used)."""
    try:
        if info.proto is None:
            return ir.load(str(info.path))
        model = ir.serde.deserialize_model(info.proto)
        info.proto = None  # the IR holds what it needs; free the protobuf
        ir.external_data.set_base_dir(model.graph, str(info.path.parent))
        _set_attribute_base_dir(model, info.path.parent)
        return model
    except Exception as e:
        raise InputModelError(f"{info.path}: onnx-ir could not read the model ({first_line(e)})") from e


def _set_attribute_base_dir(model: ir.Model, base: Path) -> None:
    """``set_base_dir`` does not reach model-local functions: their external attribute tensors
    would be read relative to the working directory."""
    for _, _, _, tensor in attribute_tensors(model):
        if isinstance(tensor, ir.ExternalTensor) and not tensor.base_dir:
            tensor.base_dir = str(base)


def default_output_path(input_path: Path) -> Path:
    return input_path.with_name(input_path.stem + ".flashnorm.onnx")


def check_output(output: str | os.PathLike, info: InputInfo, in_place: bool = False) -> Path:
    """Where the output goes; refuses to overwrite the input or its data unless in_place, and
    any existing path that is not a regular file (a FIFO, a device, a socket, a broken link)."""
    out = Path(output)
    if out.exists() and out.is_dir() or str(output).endswith(os.sep):
        out = out / info.path.name
    parent = out.parent
    check_folder_can_exist(parent, "the output folder")
    if out.exists() and out.is_dir():
        raise OutputPathError(f"{out}: the output path is a folder")
    check_regular_or_absent(out, "output")
    resolved = out.resolve() if out.exists() else parent.resolve() / out.name
    data = resolved.with_name(resolved.name + ".data")
    same_model = resolved == info.path.resolve()
    hits_data = resolved in info.data_files or data in info.data_files
    if (same_model or hits_data) and not in_place:
        what = "the input model" if same_model else "the input's external data file"
        raise OutputPathError(
            f"{out}: output would overwrite {what}; choose another -o path (or pass --in-place)"
        )
    if in_place and not same_model:
        raise OutputPathError("--in-place writes the input path itself; do not combine it with another -o")
    return out


def check_folder_can_exist(folder: Path, what: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder (missing ones are created later)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise OutputPathError(f"{existing}: {what} is not a folder (it is a file)")


def check_regular_or_absent(path: Path, what: str) -> None:
    """Output paths are regular files (or links to one) or absent; anything else is refused."""
    import stat

    if not os.path.lexists(path):
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise OutputPathError(f"{path}: the {what} path is a broken link; remove it or choose another") from None
    if not stat.S_ISREG(mode):
        raise OutputPathError(f"{path}: the {what} path is {file_kind(mode)}, not a regular file; choose another")


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, from its ``st_mode``, for error messages."""
    import stat

    return ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a folder" if stat.S_ISDIR(mode) else "not a regular file")


def check_report_path(
    path: str | os.PathLike | None,
    info: InputInfo,
    output: Path | None = None,
    output_folder: Path | None = None,
    reserved: set[Path] | None = None,
) -> Path | None:
    """Refuse, before any work, a --report path that cannot be written or that names another
    file of the same run: the input, its data, the output, the output's data file (any name
    this tool may give it), a file the run writes into ``output_folder``, or ``reserved``."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{p}: the report path is a folder")
    check_folder_can_exist(p.parent, "the report's folder")
    check_regular_or_absent(p, "report")
    resolved = p.resolve()
    if resolved == info.path.resolve() or resolved in info.data_files:
        raise OutputPathError(f"{p}: the report would overwrite the input model or its data")
    if output is not None:
        out = output.resolve() if output.exists() else output.parent.resolve() / output.name
        if resolved == out:
            raise OutputPathError(f"{p}: the report would overwrite the output model; choose another --report path")
        if resolved.parent == out.parent and publish.data_name_pattern(out.name).fullmatch(resolved.name):
            raise OutputPathError(f"{p}: the report would overwrite the output's data file; choose another --report path")
        if resolved.parent == out.parent and publish.staging_pattern(out.name).fullmatch(resolved.name):
            raise OutputPathError(f"{p}: the report path is a staging folder name; choose another --report path")
    if resolved.parent.is_dir() and any(
        os.path.normpath(resolved.name) == loc for loc in publish.referenced_files(resolved.parent)
    ):
        # e.g. the data file of the model the output replaces: until the commit, that model is
        # what the destination loads, so its data must stay intact
        raise OutputPathError(f"{p}: the report would overwrite the external data of a model in its folder; "
                              "choose another --report path")
    if reserved and resolved in {r.resolve() for r in reserved}:
        raise OutputPathError(f"{p}: the report would overwrite a file this run writes; choose another --report path")
    if output_folder is not None:
        folder = output_folder.resolve()
        if folder == resolved.parent or folder in resolved.parents:
            rel = resolved.relative_to(folder)
            if ".onnx" in rel.name or os.path.lexists(info.path.parent / rel):
                raise OutputPathError(
                    f"{p}: the report would overwrite a file this run writes into {output_folder}; "
                    "choose another --report path"
                )
    return p


def write_report(report, path: str | os.PathLike) -> None:
    """Write the JSON report atomically (creating its folder); an OSError becomes an OutputPathError."""
    p = Path(path)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        check_regular_or_absent(p, "report")
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        report.write_json(tmp)
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OutputPathError(f"{p}: cannot write the report ({first_line(e)})") from e


def wants_external_data(info: InputInfo, model_bytes: int) -> bool:
    return info.has_external_data or model_bytes > EXTERNAL_DATA_THRESHOLD


def write_atomic(
    model: ir.Model,
    output: Path,
    external: bool,
    progress: Callable[[int, int], None] | None = None,
    keep_samples: dict | None = None,
    read_back: bool = True,
    copied: dict | None = None,
    sample_window: Callable | None = None,
) -> StagedOutput:
    """Write the model into a hidden staging folder next to ``output``; ``commit()`` publishes it
    (see :mod:`flashnorm_onnx.io.publish`). ``progress(bytes_done, bytes_total)`` while the external
    data file fills; ``keep_samples`` and ``read_back``: see ``tensor_io.save_with_external_data``
    (streamed writes only); ``copied``: the tensors the streamed writer copied unchanged, and from where."""
    staged = publish.stage(output, external)
    try:
        path = staged.model_path
        if external and hasattr(os, "preadv"):
            # streamed: each folded tensor read once and folded block by block, unchanged tensors
            # copied from the input's data file; the same bytes as ir.save writes
            from flashnorm_onnx.io import tensor_io

            tensor_io.save_with_external_data(model, path, staged.data_name, progress=progress,
                                              keep_samples=keep_samples, read_back=read_back, copied=copied,
                                              sample_window=sample_window)
        elif external:  # no positioned reads (Windows): onnx-ir's writer
            callback = None
            if progress is not None:
                def callback(tensor, meta) -> None:  # noqa: ANN001
                    progress(meta.index + 1, meta.total)
            ir.save(model, str(path), external_data=staged.data_name, callback=callback)
        else:
            ir.save(model, str(path))
    except BaseException as e:
        staged.abandon()
        if isinstance(e, OSError):
            raise OutputPathError(f"{output}: writing the output failed ({first_line(e)}); nothing was written") from e
        if isinstance(e, ValueError) and "2GB" in str(e).replace(" ", ""):
            raise OutputPathError(f"{output}: model too large for one protobuf file") from e
        raise
    return staged


def _link_leaving(base: Path, location: str) -> str | None:
    """The first symbolic link on ``location`` (relative to ``base``) whose target lies outside
    ``base``, as a path relative to ``base``; None when no link takes it out."""
    parts = Path(os.path.normpath(location)).parts
    if not parts or parts[0] == "..":
        return None
    for i in range(1, len(parts) + 1):
        here = base.joinpath(*parts[:i])
        if here.is_symlink():
            target = here.resolve()
            if base != target and base not in target.parents:
                return os.path.join(*parts[:i])
    return None


def _fixed_size(tensor: onnx.TensorProto) -> bool:
    """A dtype whose raw bytes are exactly count * itemsize (not strings, not 4-bit packed)."""
    try:
        itemsize = ir.DataType(tensor.data_type).itemsize
    except Exception:
        return False
    return tensor.data_type != onnx.TensorProto.STRING and float(itemsize).is_integer() and itemsize >= 1


def _expected_bytes(tensor: onnx.TensorProto) -> int:
    count = _element_count(tensor)
    try:
        itemsize = ir.DataType(tensor.data_type).itemsize
    except Exception:
        itemsize = 1
    return int(count * itemsize)


def _element_count(tensor: onnx.TensorProto) -> int:
    import math

    return math.prod(tensor.dims)


#: TensorProto fields that hold inline values (besides raw_data).
_TYPED_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _holds_data(tensor: onnx.TensorProto) -> bool:
    """Any inline data at all (raw or typed), read by length only: nothing is materialised.

    (Reading ``raw_data`` copies it, so a fixed-size dtype's presence is enough: its length is
    checked against the shape right after.)"""
    if any(len(getattr(tensor, f)) > 0 for f in _TYPED_DATA_FIELDS):
        return True
    if not tensor.HasField("raw_data"):
        return False
    return _fixed_size(tensor) or len(tensor.raw_data) > 0


def _typed_bytes(tensor: onnx.TensorProto) -> int:
    return _expected_bytes(tensor)
