"""Keep a GGUF file's Q4_1 blocks for the CPU float32 products instead of their dequantized weights.

The float32 path reads every weight as 4 bytes; a Q4_1 block holds 32 of them in 20 (a float16
scale d and offset m, 32 four-bit q; a weight is d * q + m). The AVX2 kernel's `linear_q4`
(decoding/kernels/linear_avx2.c) takes them as blocks and dequantizes in registers to exactly the
float32 path's weights (d * q is exact in float32), so its outputs are bit-identical to the float32
product's at about a fifth of the bytes: a plain step reads ~180 MB of weights instead of ~540 on
the default model.

Which blocks belong to which product is found by value, not by name: a layer's float32 rows are
looked up among the dequantized rows of that layer's Q4_1 tensors (`blk.N.*`). That covers fused
products (q, k and v in one), the row permutation transformers applies to q and k when it reads a
GGUF file, and any family's names, and it is a check: a product takes blocks only when every one
of its rows equals, bit for bit, a dequantized Q4_1 row; otherwise it keeps its float32 weights.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np

from decoding import cpu_linear


def _layer_tensors(gguf_path: Path) -> dict[int, list[np.ndarray]]:
    """Each layer's Q4_1 tensors as raw rows [rows, k / 32, 20]."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    layers: dict[int, list[np.ndarray]] = defaultdict(list)
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and parts[0] == "blk" and parts[1].isdigit():
            raw = np.asarray(t.data)
            layers[int(parts[1])].append(raw.reshape(raw.shape[0], -1, cpu_linear.Q4_BYTES))
    return layers


def adopt_q4_blocks(model, gguf_path: Path) -> tuple[int, int, int]:
    """Give each of the model's layer products that the AVX2 kernel runs, and whose rows are all
    Q4_1 rows of the file, those blocks in place of its float32 weights. Returns (products that
    took blocks, products looked at, float32 bytes freed)."""
    from decoding.model import Linear

    layers = _layer_tensors(gguf_path)
    taken = seen = freed = 0
    for i, layer in enumerate(getattr(model, "layers", [])):
        values = ([getattr(layer, f.name) for f in dataclasses.fields(layer)] if dataclasses.is_dataclass(layer)
                  else list(vars(layer).values()))
        linears = [v for v in values if isinstance(v, Linear) and v.kernel is not None and v.q4 is None]
        seen += len(linears)
        tensors = layers.get(i)
        if not tensors:
            continue
        rows: dict[tuple[int, bytes], tuple[int, int]] = {}  # (k, a row's float32 bytes) -> (tensor, row)
        for t, blocks in enumerate(tensors):
            values = cpu_linear.q4_values(blocks)
            for r in range(values.shape[0]):
                rows.setdefault((values.shape[1], values[r].tobytes()), (t, r))
        for lin in linears:
            n, k = lin.out_features, lin.in_features
            if n % cpu_linear.PANEL or k % cpu_linear.Q4_K:
                continue
            weight = lin.weight.transpose(1, 2).reshape(-1, k)[:n].numpy()  # unpacked float32 rows
            found = [rows.get((k, weight[r].tobytes())) for r in range(n)]
            if any(f is None for f in found):
                continue
            blocks = np.stack([tensors[t][r] for t, r in found])
            freed += lin.weight.numel() * lin.weight.element_size()
            lin.use_q4(cpu_linear.pack_q4(blocks))
            taken += 1
    model.q4_products = getattr(model, "q4_products", 0) + taken
    return taken, seen, freed
