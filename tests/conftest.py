import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from decoding.loader import LoadedModel  # noqa: E402

# Every test run (and every server it starts) times its own forward calibrations: one cached by an
# earlier run, perhaps on a busy machine, would make tree sizes depend on that run.
os.environ["LOGITSPEC_CALIBRATION_CACHE"] = tempfile.mkdtemp(prefix="logitspec-test-calibration-")
atexit.register(shutil.rmtree, os.environ["LOGITSPEC_CALIBRATION_CACHE"], True)
# Likewise the acceptance statistics servers save (decoding/statistics_cache.py): a server started
# by one test would otherwise start from what another test's traffic taught an earlier one.
os.environ["LOGITSPEC_STATISTICS_CACHE"] = tempfile.mkdtemp(prefix="logitspec-test-statistics-")
atexit.register(shutil.rmtree, os.environ["LOGITSPEC_STATISTICS_CACHE"], True)

# Tests of our C kernel (decoding/cpu_linear.py): it is built only on x86 with AVX2 and a compiler.
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None
needs_kernel = pytest.mark.skipif(not (HAS_AVX2 and HAS_CC), reason="the kernel needs AVX2 and a C compiler")


class TinyTokenizer:
    """Enough of a tokenizer for engine tests on a random model: ids are the text."""

    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))

    def encode(self, text):
        return [3 + (ord(c) % 90) for c in text]

    def apply_chat_template(self, turns, add_generation_prompt=True, tokenize=True):
        return [2] + [3 + (ord(c) % 90) for t in turns for c in t["content"]]


@pytest.fixture(scope="session")
def tiny_hf():
    """A randomly initialised 2-layer Llama (HF reference implementation) and its config dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    hf = config.to_dict()
    hf["model_type"] = "llama"
    return model, hf


@pytest.fixture(scope="session")
def tiny_loaded(tiny_hf):
    model, hf = tiny_hf
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return LoadedModel("tiny-random-llama", Path("."), hf, state, TinyTokenizer())


@pytest.fixture
def priors(tmp_path, monkeypatch):
    """What is shipped for a model (decoding/priors/: the prior, the corpus) read from and written to
    an empty folder instead of the package's."""
    from decoding import statistics_cache

    monkeypatch.setattr(statistics_cache, "PRIORS", tmp_path / "priors")
    return tmp_path / "priors"


@pytest.fixture(scope="session")
def real_loaded():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from decoding.loader import load

    return load(None)


def engines_for(loaded, **config):
    """ar, pld and logitspec engines sharing one copy of the model's weights."""
    from decoding.config import EngineConfig
    from decoding.engine import Engine

    engines, model = {}, None
    for method in ("ar", "pld", "logitspec"):
        engines[method] = Engine(EngineConfig(method=method, **config), loaded=loaded, model=model)
        model = engines[method].model
    return engines


@pytest.fixture(scope="session")
def real_engines(real_loaded):
    return engines_for(real_loaded, max_context=2048)
