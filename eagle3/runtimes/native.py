"""eagle3's native CPU kernels (kernels/*.cpp): few-row matmuls that stream each weight once for all rows,
register-blocked, in fp32 and with int8 weights packed in panels (linear.cpp; `pack`), and a forward's decoder
layers as one call (forward.cpp: the target's for native_forward.py, the EAGLE-3 draft's for native_draft.py).
Built once per machine with its C++ compiler (-O3 -march=native) into $EAGLE3_HOME/kernels, and loaded with
ctypes: no torch headers, so a build takes seconds.

The native runtimes run on them (native_weights.py moves a model's matrices onto them). Without
a compiler, on a CPU without AVX2, or with EAGLE3_NATIVE=0, they are simply absent (`library()` is None and
`why_unavailable()` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from eagle3.paths import eagle3_home

KERNELS = Path(__file__).parent / "kernels"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_library: ctypes.CDLL | None = None
_why: str | None = None  # why the library is unavailable, once a load failed


def why_unavailable() -> str | None:
    """None when the kernels load; otherwise the reason, in a few words."""
    library()
    return _why


def library() -> ctypes.CDLL | None:
    """The kernels, built first when this machine has none yet; None when they cannot be had here."""
    global _library, _why
    if _library is not None or _why is not None:
        return _library
    if os.environ.get("EAGLE3_NATIVE", "1") == "0":
        _why = "EAGLE3_NATIVE=0"
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        _why = "no C++ compiler (g++) on this machine"
        return None
    try:
        _library = load(_build(compiler))
    except (OSError, subprocess.SubprocessError) as err:
        _why = f"the kernels did not build or load ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return _library


def load(built: Path) -> ctypes.CDLL:
    """A build of the kernels, its functions typed for ctypes."""
    lib = ctypes.CDLL(str(built))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.eagle3_vector_width.restype = i
    lib.eagle3_linear_f32.argtypes = [p, i, i, p, i, p]
    lib.eagle3_linear_i8.argtypes = [p, i, i, p, p, i, p]
    lib.eagle3_linear_w8a8.argtypes = [p, i, i, p, p, i, p]
    lib.eagle3_w8a8_native_dot.restype = i
    lib.eagle3_forward.argtypes = [p, p, ctypes.c_float, p, p, p, p, p, p, p, i, p]
    lib.eagle3_draft_forward.argtypes = [p, p, ctypes.c_float, p, p, p, p, p, p, p]
    lib.eagle3_draft_logits.argtypes = [p, i, i, i, ctypes.c_float, p, p]
    return lib


def source_digest() -> str:
    """A digest of the kernels' sources: what the native runtimes' measured costs depend on besides the CPU."""
    digest = hashlib.sha256()
    for path in sorted(KERNELS.glob("*.[ch]pp")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _build(compiler: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The shared library for this source, compiler, flags and CPU, compiled into the cache when missing
    (written to a temporary name, then renamed: a concurrent or interrupted build never leaves a broken file).
    Other flags than FLAGS build variants (tests: the kernels without an instruction set extension)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    sources = sorted(KERNELS.glob("*.cpp"))
    digest = hashlib.sha256(version.encode() + " ".join(flags).encode() + _cpu_flags().encode())
    digest.update(source_digest().encode())
    target = eagle3_home() / "kernels" / f"eagle3-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, *map(str, sources), "-o", tmp], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def vector_width() -> int:
    """The floats in one of the kernels' vectors (16 with AVX-512, 8 with AVX2): the step of their panels."""
    return library().eagle3_vector_width()


def pack(weight: Tensor) -> Tensor:
    """A matrix [out, in] (fp32 or int8) in the kernels' panel order (kernels/linear.hpp), flat: rows [4b, 4b + 4)
    step by step (each vector_width() columns of the four rows, then their tail columns), then the rows after
    the last full panel as they are."""
    out, n_in = weight.shape
    panels, body = out // 4, n_in - n_in % vector_width()
    grouped = weight[: 4 * panels].reshape(panels, 4, n_in)
    steps = grouped[:, :, :body].reshape(panels, 4, -1, vector_width()).transpose(1, 2).reshape(panels, -1)
    tails = grouped[:, :, body:].reshape(panels, -1)
    return torch.cat([torch.cat([steps, tails], 1).reshape(-1), weight[4 * panels :].reshape(-1)]).contiguous()


def unpack(packed: Tensor, out: int, n_in: int) -> Tensor:
    """pack's inverse: the matrix [out, in]."""
    panels, body = out // 4, n_in - n_in % vector_width()
    grouped = packed[: 4 * panels * n_in].reshape(panels, 4 * n_in)
    steps = grouped[:, : 4 * body].reshape(panels, -1, 4, vector_width()).transpose(1, 2).reshape(panels, 4, body)
    tails = grouped[:, 4 * body :].reshape(panels, 4, n_in - body)
    return torch.cat([torch.cat([steps, tails], 2).reshape(4 * panels, n_in), packed[4 * panels * n_in :].reshape(-1, n_in)])


# W8A8 panels (kernels/w8a8.hpp): rows in panels of W8A8_ROWS, columns padded to blocks of W8A8_BLOCK.
W8A8_ROWS, W8A8_BLOCK = 16, 32


def w8a8_padded(out: int, n_in: int) -> tuple[int, int]:
    """The shape [rows, columns] a W8A8 matrix [out, in] is stored in: padded to whole panels and blocks."""
    return -(-out // W8A8_ROWS) * W8A8_ROWS, -(-n_in // W8A8_BLOCK) * W8A8_BLOCK


def pack_w8a8(q: Tensor) -> Tensor:
    """An int8 matrix [out, in] in the W8A8 kernel's panel order (kernels/w8a8.hpp), flat uint8: each value plus
    128, rows padded to a multiple of 16 and columns to a multiple of 32 with zeros; per panel of 16 rows, for
    each 4 columns, the 16 rows' 4 values row after row."""
    out, n_in = q.shape
    padded = torch.zeros(*w8a8_padded(out, n_in), dtype=torch.int16)
    padded[:out, :n_in] = q.to(torch.int16)
    panels, groups = padded.shape[0] // W8A8_ROWS, padded.shape[1] // 4
    grouped = (padded + 128).to(torch.uint8).reshape(panels, W8A8_ROWS, groups, 4).transpose(1, 2)
    return grouped.reshape(-1).contiguous()


def unpack_w8a8(packed: Tensor, out: int, n_in: int) -> Tensor:
    """pack_w8a8's inverse: the int8 matrix [out, in]."""
    rows, cols = w8a8_padded(out, n_in)
    grouped = packed.reshape(rows // W8A8_ROWS, cols // 4, W8A8_ROWS, 4).transpose(1, 2).reshape(rows, cols)
    return (grouped.to(torch.int16) - 128).to(torch.int8)[:out, :n_in]


def w8a8_native_dot() -> bool:
    """Whether this CPU does the W8A8 kernel's dot products itself (VNNI) rather than emulating them."""
    return bool(library().eagle3_w8a8_native_dot())


def linear(x: Tensor, packed: Tensor, out: int, scale: Tensor | None = None) -> Tensor:
    """x [..., in] @ W^T -> [..., out] for the matrix W [out, in] that `packed` holds in panels, x and the result
    fp32 on the CPU: fp32 or int8 weights in pack's panels, or uint8 in pack_w8a8's (x quantized per block by
    the kernel); int8 and W8A8 weights take `scale` [out] (one per output row). The caller checks `library()`
    first."""
    lib = library()
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    n_in = rows.shape[1]
    expected = torch.Size(w8a8_padded(out, n_in)).numel() if packed.dtype == torch.uint8 else out * n_in
    if packed.numel() != expected or not packed.is_contiguous():
        raise ValueError(f"packed weights of {packed.numel()} values for a [{out}, {n_in}] matrix")
    y = torch.empty(rows.shape[0], out, dtype=torch.float32)
    if packed.dtype == torch.uint8:
        lib.eagle3_linear_w8a8(rows.data_ptr(), rows.shape[0], n_in, packed.data_ptr(), scale.data_ptr(), out,
                               y.data_ptr())  # fmt: skip
    elif packed.dtype == torch.int8:
        lib.eagle3_linear_i8(rows.data_ptr(), rows.shape[0], rows.shape[1], packed.data_ptr(), scale.data_ptr(), out,
                             y.data_ptr())  # fmt: skip
    else:
        lib.eagle3_linear_f32(rows.data_ptr(), rows.shape[0], rows.shape[1], packed.data_ptr(), out, y.data_ptr())
    return y.view(*x.shape[:-1], out)


def pointer_table(rows: list[list[Tensor | int | None]]) -> tuple[Tensor, list[Tensor]]:
    """The int64 table [rows, fields] a kernel reads its weights from: each tensor's data pointer, 0 for None,
    ints as they are; and the tensors pointed to, which the caller keeps for as long as it uses the table."""
    table = torch.zeros(len(rows), len(rows[0]), dtype=torch.int64)
    keep = []
    for r, row in enumerate(rows):
        for f, entry in enumerate(row):
            if isinstance(entry, Tensor):
                entry = entry.detach().contiguous()  # (weights already are: no copy)
                keep.append(entry)
                table[r, f] = entry.data_ptr()
            elif entry is not None:
                table[r, f] = int(entry)
    return table, keep
