"""Qwen3: the Llama layer with an RMSNorm on each query and key head before RoPE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.model import Checkpoint, Layer, Model


@dataclass(slots=True)
class QKNormLayer(Layer):
    q_norm: torch.Tensor | None = None  # [head_dim]
    k_norm: torch.Tensor | None = None  # [head_dim]


class Qwen3(Model):
    architectures = ("qwen3",)
    layer_class = QKNormLayer

    def _attention_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(super()._attention_weights(w, p), q_norm=self._norm_weight(w, p + "self_attn.q_norm.weight"),
                    k_norm=self._norm_weight(w, p + "self_attn.k_norm.weight"))

    def _project_qkv(self, x: torch.Tensor, layer: QKNormLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super()._project_qkv(x, layer)
        return self._rms_norm(q, layer.q_norm), self._rms_norm(k, layer.k_norm), v
