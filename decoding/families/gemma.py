"""Gemma 2 and Gemma 3 (text): the Llama layer with Gemma's differences.

- RMSNorm scales by (1 + weight), in fp32 before the cast (Llama casts, then scales);
- the embedding is scaled by sqrt(hidden_size);
- GeLU-tanh gate (`hidden_activation`);
- norms after attention and after the feed-forward too (four per layer);
- queries scaled by query_pre_attn_scalar^-0.5, not head_dim^-0.5;
- layers alternate sliding-window and global attention (config.layer_types);
- final logits soft-capped (final_logit_softcapping), Gemma 2's attention logits too;
- Gemma 3: q/k RMSNorm per head, and its own RoPE base for local layers (rope_local_base_freq).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.families.qwen3 import QKNormLayer
from decoding.model import Checkpoint, Model, Rope


@dataclass(slots=True)
class GemmaLayer(QKNormLayer):
    pre_feedforward_norm: torch.Tensor | None = None  # [hidden]
    post_feedforward_norm: torch.Tensor | None = None  # [hidden]


class Gemma2(Model):
    architectures = ("gemma2",)
    layer_class = GemmaLayer

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # transformers multiplies by this scale cast to the weights' dtype (in bfloat16, 8.0 for 64)
        self.embed_scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=self.dtype, device=self.device)

    def _activation(self) -> str:
        return self.hf.hidden_activation

    def _norm_weight(self, w: Checkpoint, name: str) -> torch.Tensor:
        return 1.0 + w(name, torch.float32)  # Gemma's RMSNorm scales by 1 + weight, in fp32

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return (xf * weight).to(x.dtype)

    def _mlp_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(super()._mlp_weights(w, p),
                    pre_feedforward_norm=self._norm_weight(w, p + "pre_feedforward_layernorm.weight"),
                    post_feedforward_norm=self._norm_weight(w, p + "post_feedforward_layernorm.weight"))

    def _attention_options(self, i: int) -> dict:
        options = dict(super()._attention_options(i), scale=self.hf.query_pre_attn_scalar ** -0.5)
        if self.hf.attn_logit_softcapping is not None:
            options["softcap"] = self.hf.attn_logit_softcapping
        return options

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens] * self.embed_scale

    def _mlp_eager(self, x: torch.Tensor, attn: torch.Tensor, layer: GemmaLayer) -> torch.Tensor:
        """Gemma's layer after attention: the attention output is normed (post_attention_norm)
        before the residual, and the feed-forward sits between norms of its own."""
        x = x + self._rms_norm(layer.o_proj(attn), layer.post_attention_norm)
        h = self._feed_forward(self._rms_norm(x, layer.pre_feedforward_norm), layer)
        return x + self._rms_norm(h, layer.post_feedforward_norm)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super()._logits(x)
        cap = self.hf.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3(Gemma2):
    architectures = ("gemma3_text",)

    def _attention_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(super()._attention_weights(w, p), q_norm=self._norm_weight(w, p + "self_attn.q_norm.weight"),
                    k_norm=self._norm_weight(w, p + "self_attn.k_norm.weight"))

    def _attention_options(self, i: int) -> dict:
        # transformers' Gemma 3 attention takes no logit soft-capping, whatever the config says.
        options = super()._attention_options(i)
        options.pop("softcap", None)
        return options

    def _ropes(self) -> tuple[dict[str, Rope], list[str]]:
        types = list(self.hf.layer_types)
        return {t: Rope(self.hf, self.device, self.dtype, layer_type=t) for t in set(types)}, types

    def _project_qkv(self, x: torch.Tensor, layer: GemmaLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super()._project_qkv(x, layer)
        return self._rms_norm(q, layer.q_norm), self._rms_norm(k, layer.k_norm), v


class Gemma3Multimodal(Gemma3):
    """A Gemma 3 image-text checkpoint (4B and larger; model_type gemma3) run as the text model it
    contains: its text_config and its language model's weights. The vision tower is not loaded,
    as the API takes text only."""

    # checkpoints name the language model's weights so; transformers 5 keeps them as the second
    PREFIXES = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                "model.language_model.": "model."}

    def __init__(self, hf_config: dict, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        # transformers' Gemma3ForConditionalGeneration caps no logits (released Gemma 3 configs set no cap)
        text_config = dict(hf_config["text_config"], model_type="gemma3_text", final_logit_softcapping=None)
        text_config.setdefault("tie_word_embeddings", hf_config.get("tie_word_embeddings", True))
        text_state = {}
        for name, tensor in state.items():
            for prefix, ours in self.PREFIXES.items():
                if name.startswith(prefix):
                    text_state[ours + name[len(prefix):]] = tensor
        super().__init__(text_config, text_state, device, dtype)
