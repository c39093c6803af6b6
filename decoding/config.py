"""Engine configuration: one validated dataclass, built once from CLI flags and passed down whole."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ar", "pld", "logitspec")
SAMPLERS = ("coupled", "specinfer")
ATTENTION = ("auto", "batched", "per-sequence")
# gguf: the GGUF file's own quantized weights, run by llama.cpp (decoding/llama_cpp_runner.py).
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "gguf")
RUNNERS = ("auto", "native", "transformers", "llama.cpp")  # decoding/families/__init__.py


_UNITS = {"": 2**20, "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mi": 2**20, "mib": 2**20,
          "mb": 10**6, "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes in "2GiB", "512MiB", "1.5G", "800MB" or a bare number of MiB."""
    s = text.strip().lower()
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = s[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise ValueError(f"a memory size is a positive number with an optional unit (KiB, MiB, GiB, MB, GB), "
                         f"got {text!r}")
    return int(value * _UNITS[unit])


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None = embedded SmolLM2-135M-Instruct
    method: str = "logitspec"
    # Model runner: native (a family of decoding/families/), transformers (transformers' own model
    # class over our KV cache: any decoder it loads, slower), or auto (native where there is one).
    runner: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 1  # KV slots = sequences decoded together
    max_context: int = 4096  # tokens per slot (prompt + output)
    tree_capacity: int = 64  # most tokens in one sequence's verification forward
    adaptive: bool = True  # cost-aware tree sizing
    draft_margin: float = 0.05  # draft only when expecting this much more tokens/s than plain decoding
    prefill_chunk: int = 512
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    sampler: str = "coupled"  # lossless sampling verifier: coupled (seed-reproducible) or specinfer
    # Attention calls per layer: one for the whole batch, one per sequence, or auto (batched on a
    # GPU; on a CPU batched unless padding adds more than half the query rows).
    attention: str = "auto"
    # torch.compile the layers' dense parts. Off until measured on a GPU (bench/gpu_check.sh).
    compile: bool = False
    # Start-up forward timings for tree sizing: rounds over the sizes (median per size kept), read
    # from the per-machine cache when an entry has at least this many (decoding/calibration_cache.py).
    calibration_rounds: int = 5
    recalibrate: bool = False  # time the forwards again even when the cache has them
    # The paged KV cache's memory: a size ("2GiB", "512MiB", "1.5G") or auto (CPU: every slot's
    # full context, at most 2 GiB; GPU: half the free memory once the weights are loaded).
    kv_memory: str = "auto"
    prefix_caching: bool = True  # reuse cached K/V of a prompt's prefix (whole blocks) across requests
    # Read the acceptance statistics an earlier process saved for this model at start, and save
    # them as requests end and at shutdown (decoding/statistics_cache.py). Off here, so that a
    # benchmark measures a fresh start; `logitspec serve` turns it on.
    persist_statistics: bool = False
    # Where nothing saved is read (above), start from the statistics shipped for this model, if
    # any (decoding/priors/; statistics_cache.load_prior) instead of from none.
    prior_statistics: bool = True
    # LogitSpec also retrieves from the corpus shipped for this model, if any (its own answers to
    # questions of ours; decoding/corpus.py).
    corpus: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "gguf" and self.runner not in ("auto", "llama.cpp"):
            raise ValueError(f"dtype gguf runs on the llama.cpp runner, not {self.runner!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        for name in ("max_batch", "max_context", "tree_capacity", "prefill_chunk", "calibration_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if not 0.0 <= self.draft_margin <= 1.0:
            raise ValueError("draft_margin must be between 0 and 1")
        if self.kv_memory != "auto":
            parse_size(self.kv_memory)
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
