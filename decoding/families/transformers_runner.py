"""The fallback runner: transformers' own model class for any decoder it loads, over our KV cache
and tree mask.

transformers computes everything but attention: embeddings, norms, RoPE from the position ids we
pass (a tree node's: past + depth), MLPs, logits. Attention is a function registered with
transformers' AttentionInterface that hands each layer's rotated q/k and v to our LayerAttention,
which writes K/V into the cache and applies the tree (or causal) mask, sliding window, scale and
soft-capping. With a custom attention function transformers builds no mask of its own. Every
nn.Linear is swapped for our prepacked Linear, so a row's logits do not depend on the rows beside
it, which lossless speculation needs. Slower than a native runner (a [1, N] batch through
transformers' modules), but exact."""

from __future__ import annotations

import torch
from torch import nn

from decoding.kv_cache import KVCache
from decoding.model import Linear, ModelConfig, Runner, SeqBatchEntry, transformers_config

ATTENTION_NAME = "logitspec"


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """query [1, heads, N, hd], key/value [1, kv_heads, N, hd] (rotated) -> ([1, N, heads, hd], None)."""
    attend = kwargs.get("logitspec_attend")
    if attend is None:
        raise RuntimeError("this model does not pass forward's keyword arguments to its attention, so the "
                           "transformers runner cannot drive it")
    out = attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                 scale=scaling, window=sliding_window, softcap=softcap)  # [N, heads * hd]
    return out.view(1, out.shape[0], query.shape[1], query.shape[3]), None


class _PrepackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach()
        self.linear = Linear(linear.weight.detach().contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def _prepack(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, _PrepackedLinear(child))
        else:
            _prepack(child)


class TransformersRunner(Runner):
    runner = "transformers"

    def __init__(self, hf_config: dict, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        from transformers import AttentionInterface, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        AttentionInterface.register(ATTENTION_NAME, _attention)
        config = transformers_config(hf_config)
        super().__init__(ModelConfig.from_transformers(config), device, dtype)
        try:
            with no_init_weights():  # the checkpoint's weights replace them: a random init would only cost time
                model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"unsupported model architecture {config.model_type!r}: transformers has no causal "
                             f"LM for it ({e})") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
        if set(missing) - tied or unexpected:
            raise ValueError(f"checkpoint does not match transformers' {type(model).__name__}: missing "
                             f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
        if tied:
            model.tie_weights()
        model = model.to(device).eval()
        _prepack(model)
        self.hf_model = model

    def compile(self) -> None:
        raise ValueError("compile is for the native runners; the transformers runner runs eager")

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, batch: list[SeqBatchEntry],
                cache: KVCache, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as Model.forward: the rows of every sequence go through as one [1, N] batch."""
        attend = self._layer_attention(batch, positions, cache)
        out = self.hf_model(input_ids=tokens[None], position_ids=positions[None], use_cache=False,
                            logits_to_keep=0 if logit_rows is None else logit_rows, logitspec_attend=attend)
        return out.logits[0].float()
