"""Our own float32 matrix product for x86 CPUs with AVX2 and FMA (`kernels/linear_avx2.c`).

Decoding multiplies a few rows (one token, or a draft tree's) by every weight matrix; the time is
in reading the weights. The kernel streams each weight panel once and applies it to the rows held
in registers, so it is faster than oneDNN's prepacked product at one row and grows less per row,
and every row's result is bit-identical whatever rows are beside it (see the C file).

It is compiled at first use with the system's C compiler (`CC`, else `cc`) into the cache root
(`kernels/`), keyed by the source and the compiler, and loaded with ctypes. It uses torch's own
OpenMP runtime: torch is imported first, and the library's libgomp.so.1 resolves to the copy
torch loaded, so the two share one thread pool instead of fighting over the cores.

Where it cannot be used (not x86 AVX2+FMA, no compiler, a failed build, or
LOGITSPEC_CPU_KERNEL=off), `kernel()` returns None and the model keeps oneDNN's product; the
reason is printed once. On a CPU with AVX-512 the products on a GGUF file's blocks take AVX-512
paths for three rows or more (`block_isa`; LOGITSPEC_AVX512=off keeps them on AVX2), with the
same outputs to the bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from decoding.loader import cache_root, log

SOURCE = Path(__file__).resolve().parent / "kernels" / "linear_avx2.c"
PANEL = 16  # output columns per packed panel, as in the C file
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]

# Values of LOGITSPEC_CPU_KERNEL / LOGITSPEC_Q4 (every GGUF block product) / LOGITSPEC_AVX512 that turn them off.
OFF = ("0", "off", "false", "no")

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "lib": the CDLL or None once decided; "why": the reason when None


def _cpu_supports() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def build(target: Path, source: Path = SOURCE) -> None:
    """Compile `source` (the kernel, or a version of it: bench/kernel_ab.py) to a temporary file
    beside `target`, then rename: starts racing each leave a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([_compiler(), *FLAGS, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{_compiler()} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_path() -> Path:
    version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"linear_avx2-{key}.so"


def _load() -> ctypes.CDLL:
    if os.environ.get("LOGITSPEC_CPU_KERNEL", "").lower() in OFF:
        raise RuntimeError("LOGITSPEC_CPU_KERNEL=off")
    if not _cpu_supports():
        raise RuntimeError(f"the CPU has no AVX2 ({torch.backends.cpu.get_cpu_capability()})")
    path = _library_path()
    if not path.exists():
        t0 = time.perf_counter()
        try:
            build(path)
        except OSError:  # cache root not writable: build in a private temporary folder
            path = Path(tempfile.mkdtemp(prefix="logitspec-kernels-")) / path.name
            build(path)
        log(f"compiled the AVX2 linear kernel in {time.perf_counter() - t0:.1f} s into {path}")
    lib = bind(ctypes.CDLL(str(path)))
    if os.environ.get("LOGITSPEC_AVX512", "").lower() in OFF:
        lib.linear_isa(0)
    return lib


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernel's C functions on a loaded library (those it has: an older version of the
    kernel may lack linear_q4 / linear_q8, or the scans). The products all take (x, m, k, weights, n,
    bias, y, threads)."""
    for name, result in (("linear_f32", None), ("linear_q4", ctypes.c_int), ("linear_q8", ctypes.c_int)):
        if hasattr(lib, name):
            function = getattr(lib, name)
            function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            function.restype = result
    if hasattr(lib, "linear_isa"):
        lib.linear_isa.argtypes = [ctypes.c_int]
        lib.linear_isa.restype = ctypes.c_int
    if hasattr(lib, "attend"):
        lib.attend_supports.argtypes = [ctypes.c_int64] * 3
        lib.attend_supports.restype = ctypes.c_int
        p, i = ctypes.c_void_p, ctypes.c_int64
        lib.attend.argtypes = [p, i, p, i, i, i, p, p, i, i, p, p, p, p, p, ctypes.c_float, p, ctypes.c_int]
        lib.attend.restype = ctypes.c_int
    if hasattr(lib, "row_summary"):
        lib.row_summary.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        lib.row_summary.restype = None
        lib.top_k.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.top_k.restype = ctypes.c_int64
    return lib


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot be used (the reason: `unavailable_reason()`)."""
    with _lock:
        if "lib" not in _loaded:
            try:
                _loaded["lib"] = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _loaded["lib"], _loaded["why"] = None, str(e)
                log(f"the AVX2 linear kernel is not used ({e}): oneDNN's products instead, slower")
        return _loaded["lib"]


def kernel_for(device: torch.device, dtype: torch.dtype) -> ctypes.CDLL | None:
    """The kernel for weights on this device and dtype: CPU float32 only (never built elsewhere)."""
    return kernel() if device.type == "cpu" and dtype == torch.float32 else None


def in_use(device: torch.device, dtype: torch.dtype) -> str:
    """Whose products a model on this device and dtype runs: "avx2" (ours) or "torch"."""
    return "avx2" if kernel_for(device, dtype) is not None else "torch"


def block_isa(lib: ctypes.CDLL) -> str:
    """Which instructions the block products (linear_q4, linear_q8) run on: "avx512" where the CPU
    has AVX-512F and BW (for 3 rows or more; see the C file) unless LOGITSPEC_AVX512=off, else
    "avx2". The outputs are the same bits either way."""
    return "avx512" if hasattr(lib, "linear_isa") and lib.linear_isa(-1) else "avx2"


def unavailable_reason() -> str | None:
    kernel()
    return _loaded.get("why")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W [n, k] -> panels [ceil(n / 16), k, 16]: wp[p, k, j] = W[16 p + j, k], zero padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=torch.float32)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def linear(lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, n: int,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] float32 -> [..., n]."""
    k = packed.shape[1]
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0]:
        lib.linear_f32(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), n,
                       None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


Q4_K = 32  # weights per Q4_1 block along k
Q4_BYTES = 20  # a GGUF Q4_1 block: float16 d, float16 m, 16 bytes of 4-bit q


def _q4_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 rows [n, k / 32, 20] -> d and m [n, k / 32] float32, q [n, k / 32, 32] uint8 (the
    low nibbles are k 0-15 of a block, the high ones 16-31)."""
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    qs = blocks[..., 4:]
    return d, m, np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def q4_values(blocks: np.ndarray) -> np.ndarray:
    """GGUF Q4_1 rows [n, k / 32, 20] uint8 -> their weights [n, k] float32, d * q + m as the
    float32 path's dequantization computes them."""
    d, m, q = _q4_fields(blocks)
    return (d[..., None] * q.astype(np.float32) + m[..., None]).reshape(blocks.shape[0], -1)


def pack_q4(blocks: np.ndarray) -> torch.Tensor:
    """GGUF Q4_1 rows [n, k / 32, 20] (n % 16 == 0) -> the kernel's panels (see linear_q4 in the
    C file): per 16 rows and per block, d[16] and m[16] as float32, then for each of the 32 k the
    16 rows' q in 8 bytes (row j low nibble, row j + 8 high)."""
    n, nb, _ = blocks.shape
    panels = n // PANEL
    d, m, q = _q4_fields(blocks)
    per_panel = lambda a: np.ascontiguousarray(a.reshape(panels, PANEL, nb).transpose(0, 2, 1))  # noqa: E731
    qp = q.reshape(panels, PANEL, nb, Q4_K).transpose(0, 2, 3, 1)  # [panels, nb, 32, 16]
    nibbles = (qp[..., :8] | (qp[..., 8:] << 4)).astype(np.uint8).reshape(panels, nb, Q4_K * 8)
    out = np.concatenate([per_panel(d).view(np.uint8), per_panel(m).view(np.uint8), nibbles], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(-1))


Q8_BYTES = 34  # a GGUF Q8_0 block: float16 d, 32 int8 q


def _q8_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 rows [n, k / 32, 34] -> d [n, k / 32] float32, q [n, k / 32, 32] int8."""
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    return d, blocks[..., 2:].view(np.int8)


def q8_values(blocks: np.ndarray) -> np.ndarray:
    """GGUF Q8_0 rows [n, k / 32, 34] uint8 -> their weights [n, k] float32, d * q (exact)."""
    d, q = _q8_fields(blocks)
    return (d[..., None] * q.astype(np.float32)).reshape(blocks.shape[0], -1)


def pack_q8(blocks: np.ndarray) -> torch.Tensor:
    """GGUF Q8_0 rows [n, k / 32, 34] (n % 16 == 0) -> the kernel's panels (see the C file): per 16
    rows and per block, d[16] as float32, then for each of the 32 k the 16 rows' q."""
    n, nb, _ = blocks.shape
    panels = n // PANEL
    d, q = _q8_fields(blocks)
    dp = np.ascontiguousarray(d.reshape(panels, PANEL, nb).transpose(0, 2, 1))  # [panels, nb, 16]
    qp = q.reshape(panels, PANEL, nb, Q4_K).transpose(0, 2, 3, 1).reshape(panels, nb, Q4_K * PANEL)
    out = np.concatenate([dp.view(np.uint8), qp.view(np.uint8)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(-1))


def linear_blocks(lib: ctypes.CDLL, fmt: str, x: torch.Tensor, packed: torch.Tensor, n: int, k: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., k] float32 -> [..., n], the weights a GGUF file's blocks in the kernel's panels:
    fmt "q4_1" (pack_q4) or "q8_0" (pack_q8)."""
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.float32)
    product = lib.linear_q4 if fmt == "q4_1" else lib.linear_q8
    if rows.shape[0] and product(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), n,
                                 None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("the block product could not allocate its dequantization buffer")
    return y.view(*x.shape[:-1], n)


def scans_for(logits: torch.Tensor, lib: ctypes.CDLL | None) -> bool:
    """Whether the kernel's scans (row_summary, top_k) can read these logits."""
    return lib is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 \
        and hasattr(lib, "row_summary")


def row_summary(lib: ctypes.CDLL, logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """logits [n, vocab] float32 on the CPU -> each row's first argmax and whether it is finite
    (the C file's row_summary)."""
    n, vocab = logits.shape
    rows = logits.contiguous()
    best, finite = (ctypes.c_int64 * n)(), (ctypes.c_uint8 * n)()
    lib.row_summary(rows.data_ptr(), n, vocab, best, finite)
    return list(best), [bool(f) for f in finite]


def top_k(lib: ctypes.CDLL, row: torch.Tensor, k: int) -> list[int]:
    """row [vocab] float32 on the CPU -> the indices of its k largest values, largest first (ties:
    the lower index first; never a NaN or -inf, so fewer where fewer qualify)."""
    row = row.contiguous()
    out = (ctypes.c_int64 * k)()
    found = lib.top_k(row.data_ptr(), row.numel(), k, out)
    if found < 0:
        raise MemoryError("top_k could not allocate")
    return list(out[:found])


def attention_kernel(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int,
                     head_dim: int) -> ctypes.CDLL | None:
    """The kernel's attention (`attend` in the C file) for a model of this shape, or None: CPU
    float32 only, a head dimension that is a multiple of 8, at most 32 query heads per KV head,
    and not with LOGITSPEC_CPU_ATTENTION=off (PyTorch's SDPA instead)."""
    if os.environ.get("LOGITSPEC_CPU_ATTENTION", "").lower() in OFF:
        return None
    lib = kernel_for(device, dtype)
    if lib is None or not hasattr(lib, "attend") or not lib.attend_supports(heads, kv_heads, head_dim):
        return None
    return lib


@dataclass(slots=True)
class CellRows:
    """Which cells of the paged KV cache each row of a forward sees, as the C file's `attend` reads
    them: the rows of sequence s are seq_rows[s] .. seq_rows[s + 1] - 1, its block table
    tables[seq_table[s]:], and row r sees cells 0 .. row_hi[r] - 1 and then extra_cells[extra_ptr[r]
    .. extra_ptr[r + 1] - 1] (a tree node's ancestors and itself)."""

    seq_rows: torch.Tensor  # int64 [sequences + 1]
    tables: torch.Tensor  # int32
    seq_table: torch.Tensor  # int64 [sequences]
    row_hi: torch.Tensor  # int32 [rows]
    extra_ptr: torch.Tensor  # int64 [rows + 1]
    extra_cells: torch.Tensor  # int32

    @classmethod
    def of(cls, entries: list[tuple[list[int], int, int, torch.Tensor | None]]) -> "CellRows":
        """entries: per sequence (its block table, cells already cached, new rows, their [n, n]
        tree mask or None for causal rows)."""
        seq_rows, tables, seq_table, row_hi, extra_ptr, extra_cells = [0], [], [], [], [0], []
        for table, past, n, tree_mask in entries:
            seq_table.append(len(tables))
            tables += table
            seq_rows.append(seq_rows[-1] + n)
            if tree_mask is None:  # row i sees cells 0 .. past + i
                row_hi += range(past + 1, past + n + 1)
                extra_ptr += [extra_ptr[-1]] * n
            else:  # the past, then its ancestors among the new rows and itself
                row_hi += [past] * n
                extra_cells += (tree_mask.nonzero()[:, 1] + past).tolist()
                for seen in tree_mask.sum(1).tolist():
                    extra_ptr.append(extra_ptr[-1] + seen)

        def ints(values, dtype):
            return torch.tensor(values or [0], dtype=dtype)

        return cls(ints(seq_rows, torch.int64), ints(tables, torch.int32), ints(seq_table, torch.int64),
                   ints(row_hi, torch.int32), ints(extra_ptr, torch.int64), ints(extra_cells, torch.int32))


def attend(lib: ctypes.CDLL, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: CellRows,
           scale: float) -> torch.Tensor:
    """q [N, heads, hd] float32 -> [N, heads * hd]: each row's attention over the cells `rows` gives
    it, K/V read in place from the pools [kv_heads, blocks, block_size, hd]."""
    n, heads, hd = q.shape
    kv_heads, _, block_size, _ = k_pool.shape
    if not (k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape == v_pool.shape):
        raise ValueError("attend reads K/V pools [kv_heads, blocks, block_size, hd], contiguous")
    q = q.contiguous()
    out = torch.empty(n, heads * hd, dtype=torch.float32)
    if n and not lib.attend(q.data_ptr(), rows.seq_table.numel(), rows.seq_rows.data_ptr(), heads, kv_heads, hd,
                            k_pool.data_ptr(), v_pool.data_ptr(), k_pool.stride(0), block_size,
                            rows.tables.data_ptr(), rows.seq_table.data_ptr(), rows.row_hi.data_ptr(),
                            rows.extra_ptr.data_ptr(), rows.extra_cells.data_ptr(), scale, out.data_ptr(),
                            torch.get_num_threads()):
        raise MemoryError("attention could not allocate its score buffers")
    return out
