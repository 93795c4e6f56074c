"""What the commands print: tables and summaries for people, one JSON document for scripts, progress bars."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import numpy as np

from tensorps.client import VariableInfo, codec, progress
from tensorps.client.transport import STREAM_THRESHOLD

Array = np.ndarray[Any, Any]
SHOWN_VALUES = 8


def nbytes(info: VariableInfo) -> int | None:
    """A variable's size in bytes (None: its shape is not known yet)."""
    return None if info.shape is None else codec.nbytes_of(info.shape, codec.dtype_of(info.dtype))


def shape_text(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def info_json(info: VariableInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "dtype": info.dtype.name,
        "shape": None if info.shape is None else list(info.shape),
        "initialized": info.initialized,
        "version": info.version,
        "bytes": nbytes(info),
    }


def table(rows: Sequence[Sequence[str]], header: Sequence[str], *, right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; the columns in `right` are right-aligned (numbers)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = []
    for row in (header, *rows):
        cells = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A numpy scalar as JSON can hold it: complex numbers as [real, imag]."""
    if isinstance(value, complex):
        return [value.real, value.imag]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def summary(array: Array) -> dict[str, Any]:
    """Shape, dtype, statistics (NaNs left out and counted) and the first few values of a tensor."""
    flat = array.reshape(-1)
    kind = array.dtype.kind
    if kind == "V" or array.dtype.name in ("bfloat16", "float16"):
        flat = flat.astype(np.float32)  # ml_dtypes' bfloat16 and float16: statistics in float32
        kind = "f"
    result: dict[str, Any] = {"shape": list(array.shape), "dtype": array.dtype.name, "size": int(array.size)}
    if kind == "b":
        result["true"] = int(np.count_nonzero(flat))
    elif flat.size and kind in "iuf":
        finite = flat[~np.isnan(flat)] if kind == "f" else flat
        if kind == "f":
            result["nan"] = int(flat.size - finite.size)
        if finite.size:
            result["min"] = _plain(finite.min().item())
            result["max"] = _plain(finite.max().item())
            result["mean"] = _plain(float(finite.astype(np.float64).mean()))
    elif flat.size and kind == "c":
        result["mean"] = _plain(complex(flat.astype(np.complex128).mean()))
    result["values"] = [_plain(v) for v in flat[:SHOWN_VALUES].tolist()]
    return result


def summary_text(name: str, stats: dict[str, Any]) -> str:
    lines = [f"{name}: {stats['dtype']} {shape_text(tuple(stats['shape']))}, {stats['size']} elements"]
    for key in ("min", "max", "mean", "nan", "true"):
        if key in stats:
            lines.append(f"  {key}: {stats[key]}")
    more = " ..." if stats["size"] > len(stats["values"]) else ""
    lines.append(f"  values: {' '.join(str(v) for v in stats['values'])}{more}")
    return "\n".join(lines)


class Output:
    """Prints a command's result as text or as one JSON document."""

    def __init__(self, *, as_json: bool, progress_bars: bool | None, stdout: TextIO, stderr: TextIO) -> None:
        self.as_json = as_json
        self.stdout = stdout
        self.stderr = stderr
        # None: bars when stderr is a terminal.
        self.progress_bars = stderr.isatty() if progress_bars is None else progress_bars

    def result(self, data: Any, text: str) -> None:
        print(json.dumps(data) if self.as_json else text, file=self.stdout)

    def error(self, status: str, message: str, code: int) -> None:
        if self.as_json:
            print(json.dumps({"error": {"code": status, "message": message, "exit": code}}), file=self.stdout)
        print(f"tensorps: {status}: {message}", file=self.stderr)

    @contextmanager
    def transfer(self, what: str, total: int | None) -> Iterator[None]:
        """A progress bar on stderr for a streamed transfer of `total` bytes (the client streams values
        above STREAM_THRESHOLD; None: no bar, e.g. over shm://, where a value moves in one copy)."""
        if not self.progress_bars or total is None or total <= STREAM_THRESHOLD:
            yield
            return
        from tqdm import tqdm  # noqa: PLC0415 (only for large transfers)

        bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024, file=self.stderr)

        def advance(moved: int, _total: int) -> None:
            bar.update(moved)

        with bar, progress.reporting(advance):
            yield
