"""Model families: which runner serves a checkpoint, chosen once from its config's model_type.

Native runners are `decoding.model.Model` (Llama, Mistral, Qwen2) and its small subclasses here,
one file per family. Anything else transformers can load as a causal LM runs through
`TransformersRunner`: transformers' own model class over our KV cache and tree mask, slower but
exact."""

from __future__ import annotations

import torch

from decoding.config import RUNNERS
from decoding.families.gemma import Gemma2, Gemma3, Gemma3Multimodal
from decoding.families.moe import Mixtral, Qwen3Moe
from decoding.families.phi3 import Phi3
from decoding.families.qwen3 import Qwen3
from decoding.model import Model, Runner

NATIVE: dict[str, type[Model]] = {
    arch: runner for runner in (Model, Qwen3, Qwen3Moe, Mixtral, Gemma2, Gemma3, Phi3) for arch in runner.architectures
}
NATIVE["gemma3"] = Gemma3Multimodal  # its text model: a gemma3_text inside


def build_model(hf_config: dict, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                runner: str = "auto") -> Runner:
    """runner auto: native where the architecture has a native runner, else transformers'."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    arch = hf_config.get("model_type", "")
    if runner == "native" or (runner == "auto" and arch in NATIVE):
        if arch not in NATIVE:
            raise ValueError(f"unsupported model architecture {arch!r} for the native runner; native: "
                             f"{', '.join(sorted(NATIVE))} (--runner transformers runs any decoder transformers loads)")
        return NATIVE[arch](hf_config, state, device, dtype)
    from decoding.families.transformers_runner import TransformersRunner

    return TransformersRunner(hf_config, state, device, dtype)
