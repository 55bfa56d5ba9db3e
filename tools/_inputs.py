"""Inputs of ``trainio shard``: finding the files, and reading each as a stream of Arrow record batches."""

from __future__ import annotations

import fnmatch
import io
import json
import os
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from trainio.storage import FormatError, NotFound, Store, StoreError, open_store

InputFormat = Literal["parquet", "jsonl", "csv", "arrow", "files", "imagefolder", "hf"]
FORMATS: tuple[InputFormat, ...] = ("parquet", "jsonl", "csv", "arrow", "files", "imagefolder", "hf")
SMALL_FILE_FORMATS = ("files", "imagefolder")
"""Formats of one row per file: their rows are gathered into record batches across files."""
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""The files an image folder's class folders contribute (as torchvision's ImageFolder takes them)."""
_EXTENSIONS: dict[str, InputFormat] = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv",
    ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
}
_GLOB_CHARS = "*?["


@dataclass(frozen=True, slots=True)
class InputFile:
    """One input: the store it is in, its key there, its size and its format.

    ``label`` names it in messages; ``relative`` is its path under the
    directory given; in an image folder, ``classes`` are every class
    folder's name, sorted, and the file's class is ``relative``'s first part.
    """

    store: Store
    key: str
    size: int
    format: InputFormat
    label: str
    relative: str = ""
    classes: tuple[str, ...] = ()


def find_inputs(specs: Sequence[str], fmt: InputFormat | None) -> list[InputFile]:
    """Expand paths, directories and globs (local or ``s3://``) into input files, in order.

    Directories contribute every file inside of the chosen (or inferred)
    format, in sorted order; a saved Hugging Face dataset directory is one
    input of format ``hf``.

    Raises:
        NotFound: a path matches nothing.
        FormatError: the format cannot be inferred or the files mix formats.
    """
    found: list[InputFile] = []
    for spec in specs:
        found.extend(_expand(spec, fmt))
    if not found:
        raise NotFound(", ".join(specs), "", "no input files found")
    formats = {f.format for f in found}
    if len(formats) > 1:
        raise FormatError(found[0].label, "", f"inputs mix formats {sorted(formats)}",
                          "shard one format at a time, or pass --format")
    return found


def _split(spec: str) -> tuple[Store, str]:
    """The store holding ``spec``'s parent and the key (or pattern) of ``spec`` in it."""
    if urlparse(spec).scheme == "s3":
        parsed = urlparse(spec)
        return open_store(f"s3://{parsed.netloc}"), parsed.path.strip("/")
    path = os.path.abspath(os.path.expanduser(spec.removeprefix("file://")))
    return open_store("/"), path.lstrip("/")


def _expand(spec: str, fmt: InputFormat | None) -> list[InputFile]:
    store, key = _split(spec)
    if fmt == "imagefolder" and (any(c in key for c in _GLOB_CHARS) or store.exists(key)):
        raise FormatError(spec, "", "is not a directory: --format imagefolder takes the folder holding one "
                                    "folder per class")
    if any(c in key for c in _GLOB_CHARS):
        base = key[: min(key.find(c) for c in _GLOB_CHARS if c in key)].rpartition("/")[0]
        keys = [k for k in store.list(base) if fnmatch.fnmatchcase(k, key)]
        return [_file(store, k, fmt, spec) for k in keys if _format_of(k, fmt) is not None]
    if fmt == "hf" or (fmt is None and store.exists(f"{key}/state.json")):
        return [_hf_input(store, key, spec)]
    if store.exists(key):
        return [_file(store, key, fmt, spec, strict=True)]
    keys = store.list(key)
    if not keys:
        raise NotFound(spec, "", "no such file or directory")
    if fmt == "files":
        return [InputFile(store, k, store.size(k), "files", spec, k[len(key) + 1:]) for k in keys]
    if fmt == "imagefolder":
        return _image_folder(store, key, keys, spec)
    matching = [k for k in keys if _format_of(k, fmt) is not None]
    if not matching:
        raise FormatError(spec, "", "holds no files of a format trainio reads",
                          f"pass --format (one of {', '.join(FORMATS)}); --format files takes every file")
    return [_file(store, k, fmt, spec) for k in matching]


def _image_folder(store: Store, root: str, keys: list[str], spec: str) -> list[InputFile]:
    """The images of an ImageFolder layout (``root/<class>/.../<image>``), each knowing every class."""
    relative = [k[len(root) + 1:] for k in keys]
    images = [(k, r) for k, r in zip(keys, relative)
              if os.path.splitext(r)[1].lower() in IMAGE_EXTENSIONS and not os.path.basename(r).startswith(".")]
    loose = [r for _, r in images if "/" not in r]
    if loose:
        raise FormatError(spec, loose[0], "is an image outside any class folder: an image folder holds "
                                          "<class>/<image> files", "move it into its class's folder")
    if not images:
        raise FormatError(spec, "", f"holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders")
    classes = tuple(sorted({r.split("/", 1)[0] for _, r in images}))
    return [InputFile(store, k, store.size(k), "imagefolder", spec, r, classes) for k, r in images]


def _format_of(key: str, fmt: InputFormat | None) -> InputFormat | None:
    inferred = _EXTENSIONS.get(os.path.splitext(key)[1].lower())
    if fmt is None:
        return inferred
    return fmt if fmt == "files" or inferred == fmt else None


def _file(store: Store, key: str, fmt: InputFormat | None, spec: str, strict: bool = False) -> InputFile:
    chosen = _format_of(key, fmt) if not strict or fmt is None else fmt
    if chosen is None:
        raise FormatError(spec, "", "the format cannot be inferred from the file name",
                          f"pass --format (one of {', '.join(FORMATS)})")
    label = f"{store.url.rstrip('/')}/{key}" if store.url.startswith("s3://") else "/" + key
    return InputFile(store, key, store.size(key), chosen, label, os.path.basename(key))


def _hf_input(store: Store, key: str, spec: str) -> InputFile:
    try:
        state = json.loads(store.get(f"{key}/state.json"))
        files = [entry["filename"] for entry in state["_data_files"]]
    except (NotFound, ValueError, KeyError, TypeError) as exc:
        raise FormatError(spec, "state.json", "is not a saved Hugging Face dataset (save_to_disk)",
                          "for a DatasetDict, give one split's directory") from exc
    size = sum(store.size(f"{key}/{name}") for name in files)
    return InputFile(store, key, size, "hf", spec)


def read_batches(source: InputFile, batch_rows: int) -> Generator[tuple[pa.RecordBatch, int], None, None]:
    """The rows of one input as record batches, read as a stream (memory stays bounded).

    Each batch comes with an estimate of the input's bytes consumed so far
    (non-decreasing, at most the input's size), for progress reports.

    Raises:
        FormatError: the input cannot be parsed as its format, naming it.
    """
    try:
        yield from _READERS[source.format](source, batch_rows)
    except pa.ArrowException as exc:
        raise FormatError(source.label, "", f"cannot read it as {source.format}: {exc}") from exc


def _read_parquet(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    with _open(source.store, source.key) as f:
        # pre_buffer would read ahead every row group of the file at once: unbounded memory.
        parquet = pq.ParquetFile(f, pre_buffer=False, buffer_size=8 << 20)
        total, done = max(1, parquet.metadata.num_rows), 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            done += batch.num_rows
            yield batch, source.size * done // total


_JSON_BLOCK = 1 << 20  # pyarrow's default block, parsed in parallel: a line longer than one needs a run-wide block
_JSON_RUN = 16 << 20  # whole lines handed to pyarrow at a time
_JSON_MAX_LINE = 1 << 30


def _read_jsonl(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """JSON lines of any length, parsed a run of whole lines at a time, each run with the schema of the first."""
    schema: pa.Schema | None = None
    with _open(source.store, source.key) as f:
        for run, done in _runs_of_whole_lines(f, source):
            table = _parse_json_run(source, run, schema)
            schema = table.schema
            for batch in table.to_batches():
                yield batch, done


def _runs_of_whole_lines(f: Any, source: InputFile) -> Iterator[tuple[pa.Buffer, int]]:
    """The file's bytes cut after a newline, about ``_JSON_RUN`` at a time, with the bytes read so far, the next run
    read while this one is parsed; an empty file is one empty run."""
    with ThreadPoolExecutor(1, thread_name_prefix="trainio-jsonl") as reader:
        pending: Future[tuple[pa.Buffer, int, bool]] | None = reader.submit(_run_at, f, source, 0)
        while pending is not None:
            run, end, last = pending.result()
            pending = None if last else reader.submit(_run_at, f, source, end)
            if run.size or end == 0:
                yield run, end


def _run_at(f: Any, source: InputFile, offset: int) -> tuple[pa.Buffer, int, bool]:
    """The whole lines from ``offset``, the offset after them, and whether they end the file."""
    want = _JSON_RUN
    while True:
        f.seek(offset)
        run = f.read_buffer(want) if isinstance(f, pa.NativeFile) else pa.py_buffer(f.read(want))
        if run.size < want:
            return run, offset + run.size, True
        cut = _after_last_newline(run)
        if cut:
            return run.slice(0, cut), offset + cut, False
        if want == _JSON_MAX_LINE:
            raise FormatError(source.label, "", f"a line is longer than {_JSON_MAX_LINE:,} bytes, at byte {offset:,}")
        want = min(2 * want, _JSON_MAX_LINE)


def _after_last_newline(run: pa.Buffer) -> int:
    """The length of ``run`` up to and with its last newline, 0 if it has none."""
    view, end = memoryview(run), int(run.size)
    while end:
        start = max(0, end - (1 << 16))
        found = bytes(view[start:end]).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _parse_json_run(source: InputFile, run: pa.Buffer, schema: pa.Schema | None) -> pa.Table:
    parse = pajson.ParseOptions(explicit_schema=schema)
    try:
        return pajson.read_json(pa.BufferReader(run), read_options=pajson.ReadOptions(block_size=_JSON_BLOCK),
                                parse_options=parse)
    except pa.ArrowInvalid:
        pass  # a line longer than a block ("straddling"), or a bad line: one block the run's size tells which
    try:
        return pajson.read_json(pa.BufferReader(run), parse_options=parse,
                                read_options=pajson.ReadOptions(block_size=run.size + 1, use_threads=False))
    except pa.ArrowInvalid as exc:
        raise FormatError(source.label, "", _json_problem(source, exc)) from exc


def _json_problem(source: InputFile, exc: Exception) -> str:
    """pyarrow's complaint about a JSON lines input, with the line it is about where Python's parser finds one."""
    with _open(source.store, source.key) as f:
        for number, line in enumerate(io.BufferedReader(f, 1 << 20), 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as error:
                    return f"line {number}: not JSON ({error}); pyarrow said: {exc}"
    return f"cannot read it as jsonl: {exc}"


def _read_csv(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    with _open(source.store, source.key) as f:
        for batch in pacsv.open_csv(f):
            yield batch, min(source.size, f.tell())


def _read_arrow(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    with _open(source.store, source.key) as f:
        try:
            reader: Any = ipc.open_file(f)
        except pa.ArrowInvalid:
            f.seek(0)
            for batch in ipc.open_stream(f):
                yield batch, min(source.size, f.tell())
            return
        count = max(1, reader.num_record_batches)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i), source.size * (i + 1) // count


def _read_hf(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """A saved Hugging Face dataset's rows, its features (``ClassLabel`` names and the like) kept in the schema's
    ``huggingface`` metadata, from ``dataset_info.json`` where its files do not carry them."""
    state = json.loads(source.store.get(f"{source.key}/state.json"))
    metadata = _hf_metadata(source)
    done = 0
    for entry in state["_data_files"]:
        key = f"{source.key}/{entry['filename']}"
        with _open(source.store, key) as f:
            for batch in ipc.open_stream(f):
                if metadata and b"huggingface" not in (batch.schema.metadata or {}):
                    batch = batch.replace_schema_metadata({**(batch.schema.metadata or {}), **metadata})
                yield batch, min(source.size, done + f.tell())
        done += source.store.size(key)


def _hf_metadata(source: InputFile) -> dict[bytes, bytes]:
    """The ``huggingface`` schema metadata ``datasets`` writes, made from ``dataset_info.json`` (empty without it)."""
    try:
        info = json.loads(source.store.get(f"{source.key}/dataset_info.json"))
    except NotFound:
        return {}
    except ValueError as exc:
        raise FormatError(source.label, "dataset_info.json", f"is not JSON: {exc}") from exc
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        return {}
    return {b"huggingface": json.dumps({"info": {"features": info["features"]}}).encode()}


def _read_files(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    data = pa.array([source.store.get(source.key)], pa.binary())
    yield pa.record_batch({"path": pa.array([source.relative], pa.string()), "data": data}), source.size


def _read_image(source: InputFile, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """One image of an image folder: its path, bytes, class number (its folder's place among the sorted class
    folders, as torchvision's ImageFolder numbers them) and class name; the class names in the schema's metadata."""
    name = source.relative.split("/", 1)[0]
    batch = pa.record_batch({"path": pa.array([source.relative], pa.string()),
                             "image": pa.array([source.store.get(source.key)], pa.binary()),
                             "label": pa.array([source.classes.index(name)], pa.int64()),
                             "class": pa.array([name], pa.string())})
    yield batch.replace_schema_metadata({"classes": json.dumps(list(source.classes))}), source.size


_READERS = {"parquet": _read_parquet, "jsonl": _read_jsonl, "csv": _read_csv, "arrow": _read_arrow,
            "hf": _read_hf, "files": _read_files, "imagefolder": _read_image}


class _StoreFile(io.RawIOBase):
    """A read-only, seekable file over one key of a store, read by byte ranges."""

    def __init__(self, store: Store, key: str) -> None:
        super().__init__()
        self._store, self._key = store, key
        self._size = store.size(key)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(view.nbytes, self._size - self._position))
        if n:
            self._store.get_into(self._key, view[:n], self._position)
            self._position += n
        return n


def _open(store: Store, key: str) -> Any:
    """A binary file object for ``key``: the file itself when local, ranged reads (8 MiB buffered) otherwise."""
    if store.url.startswith("file://"):
        try:  # a native file: pyarrow's reader threads need not take the GIL to read a Python one
            return pa.OSFile(str(store.path_of(key)))  # type: ignore[attr-defined]
        except OSError as exc:
            raise StoreError(store.url, key, f"cannot open: {exc.strerror or exc}") from exc
    return io.BufferedReader(_StoreFile(store, key), buffer_size=8 << 20)
