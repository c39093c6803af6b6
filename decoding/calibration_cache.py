"""Forward-cost calibrations kept per machine and model, so that a start need not time them again.

The engine's start-up calibration (`Engine._calibrate`) times forwards of 1..64 tokens: several
seconds on a CPU, more than a one-shot `logitspec generate` spends generating. Those timings depend
only on what is in the key (the model, dtype, device and its threads, the processor, the torch
build, and which sizes were timed after how much context), so a start with the same key reads them
from `<cache>/calibration/` instead. An entry measured with fewer rounds than a start asks for is
not used (a quick `generate` calibration never stands in for a server's), and is replaced.
The cost model still learns from every step (`CostModel.observe`); this only sets its start.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from decoding.loader import LoadedModel, cache_root

FORMAT = 1  # bump when what a calibration measures changes, so older entries are ignored


def processor_name() -> str:
    """The CPU's model name (what benchmarks print and calibrations are keyed by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_identity(loaded: LoadedModel) -> dict:
    folder = loaded.folder.resolve()
    weights = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*.safetensors"))]
    config = hashlib.sha256(json.dumps(loaded.hf_config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"name": loaded.name, "folder": str(folder), "config": config, "weights": weights}


def calibration_key(loaded: LoadedModel, device: torch.device, dtype: torch.dtype, sizes: list[int],
                    past: int, compiled: bool = False, runner: str = "native", linear: str = "torch") -> dict:
    """Everything the timed seconds depend on. The batch size is not in it: the calibration times
    one sequence's forwards, whatever the number of KV slots."""
    return {
        "format": FORMAT,
        "model": model_identity(loaded),
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "processor": processor_name(),
        "torch": torch.__version__,
        "sizes": list(sizes),
        "past": past,
        "compiled": compiled,
        "runner": runner,  # the transformers runner is slower than the native one on the same model
        "linear": linear,  # whose matrix products: "avx2" (decoding/cpu_linear.py) or torch's
    }


def cache_folder(variable: str, name: str) -> Path:
    """The folder the environment variable names, else `name` in the cache root (LOGITSPEC_CACHE)."""
    own = os.environ.get(variable)
    return Path(own) if own else cache_root() / name


def keyed_path(folder: Path, key: dict) -> Path:
    """An entry's file in `folder`: the model's name and a digest of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return folder / f"{key['model']['name']}-{digest}.json"


def folder() -> Path:
    """LOGITSPEC_CALIBRATION_CACHE, else `calibration` in the cache root (LOGITSPEC_CACHE)."""
    return cache_folder("LOGITSPEC_CALIBRATION_CACHE", "calibration")


def entry_path(key: dict) -> Path:
    return keyed_path(folder(), key)


def load(key: dict, min_rounds: int) -> tuple[dict[int, float], dict] | None:
    """The cached seconds per forward size and the entry, or None when there is no usable entry."""
    try:
        entry = json.loads(entry_path(key).read_text())
        if entry["key"] != key or entry["rounds"] < min_rounds:
            return None
        seconds = {int(n): float(s) for n, s in entry["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # missing, unreadable or from another version: measure again
    if sorted(seconds) != sorted(key["sizes"]):
        return None
    return seconds, entry


def save(key: dict, rounds: int, seconds: dict[int, float]) -> Path | None:
    """Write an entry atomically; None when the cache folder is not writable (the start goes on)."""
    path = entry_path(key)
    entry = {"key": key, "rounds": rounds, "seconds": {str(n): s for n, s in seconds.items()},
             "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return path if write_json(path, entry) else None


def write_json(path: Path, data: dict) -> bool:
    """Write `data` to `path` atomically: two processes racing each leave a whole file. False when
    the folder is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True
