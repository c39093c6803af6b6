"""Keep a GGUF file's quantized blocks for the CPU float32 products instead of their dequantized weights.

The float32 path reads every weight as 4 bytes. A Q4_1 block holds 32 of them in 20 (a float16
scale d and offset m, 32 four-bit q; a weight is d * q + m), a Q8_0 block in 34 (d and 32 int8 q;
a weight is d * q). The AVX2 kernel's `linear_q4` / `linear_q8` (decoding/kernels/linear_avx2.c)
take them as blocks and dequantize in registers to exactly the float32 path's weights (d * q is
exact in float32), so their outputs are bit-identical to the float32 product's from a fraction
of the bytes. On the default model the layers are Q4_1 and the embedding table, which is also
its lm_head, Q8_0: a plain step reads ~110 MB of weights instead of ~540.

Which blocks belong to which product is found by value, not by name: a product's float32 rows are
looked up among the dequantized rows of the file's quantized tensors in its scope (a layer's
products among that layer's `blk.N.*` tensors, the lm_head among the tensors outside the layers).
That covers fused products (q, k and v in one), the row permutation transformers applies to q and
k when it reads a GGUF file, and any family's names, and it is a check: a product takes blocks
only when every one of its rows equals, bit for bit, a dequantized row of one format; otherwise it
keeps its float32 weights.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from decoding import cpu_linear

# format -> (GGML type name, bytes per block, dequantize rows, pack rows into the kernel's panels)
FORMATS = {
    "q4_1": ("Q4_1", cpu_linear.Q4_BYTES, cpu_linear.q4_values, cpu_linear.pack_q4),
    "q8_0": ("Q8_0", cpu_linear.Q8_BYTES, cpu_linear.q8_values, cpu_linear.pack_q8),
}


INDEX = "gguf_blocks.json"  # the file's block tensors, written beside the converted model


def _tensor_index(gguf_path: Path, folder: Path | None) -> list[dict]:
    """Where the file's tensors in a format the kernel takes lie: name, format, rows, bytes per row
    and byte offset of each. Parsing a GGUF file's header takes ~2 s on the default model (its
    tokenizer's 49,152 tokens and merges are read field by field), so the index is kept in
    `folder` (the converted model's, keyed by the file's path, size and time) once parsed."""
    cached = folder / INDEX if folder is not None else None
    if cached is not None and cached.exists():
        try:
            return json.loads(cached.read_text())
        except (OSError, ValueError):
            pass  # unreadable: parse again
    import gguf

    formats = {getattr(gguf.GGMLQuantizationType, name): fmt for fmt, (name, *_) in FORMATS.items()}
    index = [{"name": t.name, "format": formats[t.tensor_type], "rows": int(t.data.shape[0]),
              "row_bytes": int(t.data.shape[1]), "offset": int(t.data_offset)}
             for t in gguf.GGUFReader(str(gguf_path)).tensors if t.tensor_type in formats]
    if cached is not None:
        try:  # written whole or not at all, as the calibration cache is
            tmp = cached.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache: parse at every start
    return index


def _file_tensors(gguf_path: Path, folder: Path | None) -> dict[int | None, list[tuple[str, np.ndarray]]]:
    """The file's tensors in a format the kernel takes, by scope (a layer's index, or None for the
    tensors outside the layers), each as (format, raw rows [rows, k / 32, bytes per block])."""
    scopes: dict[int | None, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for t in _tensor_index(gguf_path, folder):
        size = FORMATS[t["format"]][1]
        raw = np.asarray(np.memmap(gguf_path, dtype=np.uint8, mode="r", offset=t["offset"],
                                   shape=(t["rows"], t["row_bytes"])))  # a plain array: memmap's indexing is slow
        parts = t["name"].split(".")
        scope = int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else None
        scopes[scope].append((t["format"], raw.reshape(t["rows"], -1, size)))
    return scopes


def _products(model) -> dict[int | None, list]:
    """The model's products the AVX2 kernel runs on float32 weights, by scope as in _file_tensors."""
    def usable(linears: list) -> list:
        return [lin for lin in linears if lin.kernel is not None and lin.blocks is None]

    scopes: dict[int | None, list] = {i: usable(layer.products()) for i, layer in enumerate(model.layers)}
    scopes[None] = usable([model.lm_head])
    return scopes


def adopt_blocks(model, gguf_path: Path, folder: Path | None = None) -> tuple[Counter, int, int]:
    """Give each of the model's products that the AVX2 kernel runs, and whose rows are all rows of
    one quantized tensor format in the file, those blocks in place of its float32 weights. Returns
    (products that took blocks, by format; products looked at; float32 bytes freed). folder: where
    to keep the file's tensor index (see _tensor_index), None to parse the file every time."""
    tensors = _file_tensors(gguf_path, folder)
    taken: Counter = Counter()
    seen = freed = 0
    for scope, linears in _products(model).items():
        seen += len(linears)
        if not linears or not tensors.get(scope):
            continue
        rows: dict[tuple[int, bytes], tuple[int, int]] = {}  # (k, a row's float32 bytes) -> (tensor, row)
        for t, (fmt, blocks) in enumerate(tensors[scope]):
            values = FORMATS[fmt][2](blocks)
            for r in range(values.shape[0]):
                rows.setdefault((values.shape[1], values[r].tobytes()), (t, r))
        for lin in linears:
            n, k = lin.out_features, lin.in_features
            if n % cpu_linear.PANEL or k % cpu_linear.Q4_K:
                continue
            weight = lin.weight.transpose(1, 2).reshape(-1, k)[:n].numpy()  # unpacked float32 rows
            found = [rows.get((k, weight[r].tobytes())) for r in range(n)]
            if any(f is None for f in found) or len({tensors[scope][t][0] for t, _ in found}) != 1:
                continue
            fmt = tensors[scope][found[0][0]][0]
            blocks = np.stack([tensors[scope][t][1][r] for t, r in found])
            freed += lin.weight.numel() * lin.weight.element_size()
            lin.use_blocks(fmt, FORMATS[fmt][3](blocks))
            taken[fmt] += 1
    return taken, seen, freed
