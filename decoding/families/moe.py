"""Mixture-of-experts families: Qwen3-MoE and Mixtral. Attention is their dense parent's; the
feed-forward is a router that picks the top-k experts of each token, each expert a SwiGLU.

Correct first, fast later: each expert runs on the rows routed to it, one Linear pair per expert
hit. A row's result does not depend on the rows beside it: every product is a prepacked Linear,
and a row adds its k experts' outputs in expert order whatever else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from decoding.families.qwen3 import QKNormLayer, Qwen3
from decoding.model import Checkpoint, Linear, Model


@dataclass(slots=True)
class MoELayer(QKNormLayer):
    router: Linear | None = None  # [experts, hidden]; None in a dense layer (Qwen3-MoE's mlp_only_layers)
    # per expert: gate_up [2 inter, hidden], down [hidden, inter]
    experts: list[tuple[Linear, Linear]] = field(default_factory=list)


class MixtureOfExperts:
    """The routed feed-forward, mixed into a dense family's runner (before it in the bases)."""

    layer_class = MoELayer
    moe_prefix = "mlp."  # the block's name in the checkpoint
    expert_names = ("gate_proj", "up_proj", "down_proj")

    def _mlp_weights(self, w: Checkpoint, p: str) -> dict:
        if p + "mlp.experts.gate_up_proj" in w:  # transformers' in-memory layout, which a GGUF conversion saves
            gate_up = w(p + "mlp.experts.gate_up_proj")  # [experts, 2 inter, hidden]
            down = w(p + "mlp.experts.down_proj")  # [experts, hidden, inter]
            experts = [(Linear(gate_up[e].contiguous()), Linear(down[e].contiguous())) for e in range(len(gate_up))]
            return dict(gate_up=None, down=None, router=w.linear(p + "mlp.gate"), experts=experts)
        moe = p + self.moe_prefix
        if moe + "gate.weight" not in w:
            return super()._mlp_weights(w, p)
        gate, up, down = self.expert_names
        experts = []
        for e in range(self.num_experts()):
            x = f"{moe}experts.{e}."
            experts.append((w.linear(x + gate, x + up), w.linear(x + down)))
        return dict(gate_up=None, down=None, router=w.linear(moe + "gate"), experts=experts)

    def _feed_forward(self, h: torch.Tensor, layer: MoELayer) -> torch.Tensor:
        if layer.router is None:
            return super()._feed_forward(h, layer)
        probs = torch.softmax(layer.router(h).float(), dim=-1)  # [N, experts]
        weights, chosen = torch.topk(probs, self.hf.num_experts_per_tok, dim=-1)  # [N, k]
        if self.normalize_top_k():
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)  # [N, hidden]
        for e in chosen.unique().tolist():  # ascending
            rows, k = torch.where(chosen == e)
            gate, up = layer.experts[e][0](h[rows]).chunk(2, dim=-1)
            y = layer.experts[e][1](self.act(gate) * up) * weights[rows, k, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


class Qwen3Moe(MixtureOfExperts, Qwen3):
    architectures = ("qwen3_moe",)

    def num_experts(self) -> int:
        return self.hf.num_experts

    def normalize_top_k(self) -> bool:
        return self.hf.norm_topk_prob


class Mixtral(MixtureOfExperts, Model):
    architectures = ("mixtral",)
    moe_prefix = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")  # gate, up, down

    def num_experts(self) -> int:
        return self.hf.num_local_experts

    def normalize_top_k(self) -> bool:
        return True
