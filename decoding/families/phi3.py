"""Phi-3 and Phi-4: the Llama layer from checkpoints that store q/k/v and gate/up already fused.

Their LongRoPE (two frequency sets, short and long) and partial rotary dims (Phi-4-mini) are
`decoding.model.Rope`'s; Phi-3-mini's sliding window applies to every layer, as in the base."""

from __future__ import annotations

from decoding.model import Checkpoint, Model


class Phi3(Model):
    architectures = ("phi3",)

    def _attention_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(
            input_norm=self._norm_weight(w, p + "input_layernorm.weight"),
            qkv=w.linear(p + "self_attn.qkv_proj"),  # [q + 2 kv, hidden]: q, k, v stacked as in the base
            o_proj=w.linear(p + "self_attn.o_proj"),
            post_attention_norm=self._norm_weight(w, p + "post_attention_layernorm.weight"),
        )

    def _mlp_weights(self, w: Checkpoint, p: str) -> dict:
        return dict(gate_up=w.linear(p + "mlp.gate_up_proj"), down=w.linear(p + "mlp.down_proj"))  # gate, then up
