"""Sampling parameters and verification of a draft tree against the target's logits.

Vocabulary: the *root* is the decided next token; *draft* nodes hang under it; a draft node is
*accepted* when verification walks into it; after the last accepted node one more token is
chosen from the target's distribution there (the *bonus* token, or a *recovered* token drawn
from the residual distribution after rejections). That token becomes the next step's root.

Greedy: walk while the child equal to the argmax exists.

Sampling, two lossless verifiers (the output distribution is exactly that of plain sampling from
the processed temperature/top-k/top-p distribution):
- `coupled` (the engine's default): the token at sequence position i is the Gumbel-max sample
  argmax(log p_i + G_i), with the noise G_i drawn from (seed, i) alone. Verification is then the
  greedy walk on perturbed logits. Since the noise does not depend on the tree, a seeded request
  gives the same text whatever the draft, tree size or batch, and the same text as `ar`.
- `specinfer`: multi-step speculative sampling with point-mass drafts: at a node, try the
  children in order; accept child c with probability r(c) under the current residual r, else zero
  r(c) and renormalise; when every child is rejected, draw from the residual. Its draws depend on
  the tree's shape, so seeded output repeats only for identical trees.
Both accept a drafted child with the same probability (its mass under the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.tree import DraftTree


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError("temperature must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on `device`: torch draws with a generator only on the generator's own device
    (a CPU generator with CUDA tensors fails), and CPU and CUDA generators are different
    algorithms (MT19937, Philox), so the same seed gives different numbers on each."""
    return torch.Generator(device=device).manual_seed(seed)


def gumbel_noise(seed: int, position: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[vocab] Gumbel(0, 1) noise on `device` that depends only on (seed, position) and the device."""
    g = generator(device, (seed * 0x9E3779B97F4A7C15 + position) % (2**63 - 1))
    u = torch.rand(vocab, generator=g, dtype=torch.float64, device=device).clamp_(min=1e-300)
    return -torch.log(-torch.log(u))


def coupled_sample(logits: torch.Tensor, params: SamplingParams, seed: int, position: int) -> torch.Tensor:
    """The token at `position` (0-dim tensor on the logits' device): Gumbel-max over the processed
    distribution of `logits` [vocab]. Reading it (int()) is left to the caller."""
    probs = processed_probs(logits[None], params)[0].double()
    noise = gumbel_noise(seed, position, probs.shape[-1], probs.device)
    return (probs.log() + noise).argmax()


def verify_coupled(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, seed: int,
                   past_len: int) -> tuple[list[int], int]:
    """Accepted node indices and the next token; node i decides sequence position past_len + depth + 1."""
    node, path = 0, [0]
    while True:
        token = int(coupled_sample(logits[node], params, seed, past_len + tree.depths[node] + 1))
        child = tree.children(node).get(token)
        if child is None:
            return path, token
        node = child
        path.append(node)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The specinfer sampler's generator for one sequence, on the device its logits live on."""
    if params.greedy:
        return None
    return generator(device, params.seed if params.seed is not None else torch.seed())


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] fp32 logits -> [n, vocab] probabilities after temperature, top-k and top-p."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from `probs` [vocab]: a 1-element tensor on the probabilities' device."""
    return torch.multinomial(probs, 1, generator=generator)


def uniform(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A U(0, 1) draw (0-dim) on `device`, for accepting a drafted child."""
    return torch.rand((), generator=generator, device=device)


def verify_greedy(tree: DraftTree, logits: torch.Tensor, best: list[int] | None = None) -> tuple[list[int], int]:
    """Accepted node indices (root first) and the bonus token. best: logits.argmax(-1), if known."""
    if best is None:
        best = logits.argmax(-1).tolist()  # [n]
    node, path = 0, [0]
    while (child := tree.children(node).get(best[node])) is not None:
        node = child
        path.append(node)
    return path, best[node]


def verify_sampling(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator | None) -> tuple[list[int], int]:
    """Tree rejection sampling; returns accepted node indices (root first) and the next token."""
    node, path = 0, [0]
    while True:
        children = tree.children(node)
        residual = processed_probs(logits[node:node + 1], params)[0]  # [vocab]
        for token, child in children.items():
            total = float(residual.sum())
            p = float(residual[token]) / total if total > 0 else 0.0
            if p > 0.0 and float(uniform(generator, residual.device)) < p:
                node = child
                path.append(node)
                break
            residual[token] = 0.0
        else:
            if float(residual.sum()) <= 0.0:  # every token with mass was drafted and rejected
                residual = processed_probs(logits[node:node + 1], params)[0]
            return path, int(sample(residual, generator))
