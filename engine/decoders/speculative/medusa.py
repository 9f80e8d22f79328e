"""Medusa-1 (Cai et al. 2024, speculative.md §10): K trained heads on the target's last hidden state, a static tree.

The heads (:mod:`engine.speculative.medusa_heads`) read the target's feature ``f_t`` at the position whose logits
gave the last committed token ``x_{t+1}``; head k proposes ``x_{t+k+1}``. The verify forward returns the target's
hidden states (no extra target pass), so the next round's feature is the one at the accepted path's end.

Each round the candidates are Medusa's static sparse tree: a fixed list of paths of top-i choices, one per depth
(path (0, 2) = head 1's best token, then head 2's third best), cut to the first ``tree_size`` paths no deeper than
the heads (and the token budget). ``MEDUSA_CHOICES`` is this project's own list in the style of Medusa's
``mc_sim_7b_63``: ordered by how often each node should be reached with well-trained heads (the best chain first,
then the runner-up tokens of the shallow heads), so every prefix of it is a tree and a small one suits this CPU.

Two acceptance rules, two decoders (the ``lossless`` flag is per decoder):

* ``medusa``: the shared verifier. The drafts are deterministic (top tokens, not samples), so greedy output equals
  greedy decoding and sampling follows the processed target exactly (speculative.md §0.2).
* ``medusa_typical``: Medusa's typical acceptance, LOSSY. A node is accepted when its parent is (or is the root)
  and the target's processed ``p(x) > min(epsilon, delta * exp(-H(p)))`` at its parent; the deepest accepted node
  wins (ties: the higher sum of log p along the path, as Medusa's ``evaluate_posterior``); the next token is drawn
  from the target's distribution there with the tokens under the same threshold removed (greedy: its argmax).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.models.registry import ASSET_MODELS_DIR
from engine.params import Param
from engine.speculative.cache import PrefixCache
from engine.speculative.feature_head import shipped_or_named_head
from engine.speculative.medusa_heads import MedusaHeads
from engine.speculative.rounds import (
    SAMPLING_PARAMS,
    Draft,
    Drafter,
    Outcome,
    Sampling,
    speculative_rounds,
)
from engine.speculative.tree import node_depths
from engine.speculative.verify import NodeCheck, Verdict

# The heads shipped in assets/, by the target model they were trained for.
SHIPPED_HEADS = {"smollm2-135m-instruct": ASSET_MODELS_DIR / "medusa-smollm2"}

# Each path's parent comes before it, so the first N paths always form a tree.
MEDUSA_CHOICES: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 0, 0), (0, 1), (2,), (1, 0), (0, 0, 0, 0),
    (0, 0, 1), (3,), (0, 2), (2, 0), (0, 1, 0), (1, 1), (0, 0, 0, 1), (4,),
    (0, 0, 2), (1, 0, 0), (0, 3), (0, 0, 1, 0), (3, 0), (0, 2, 0), (5,), (0, 1, 1),
    (2, 1), (0, 0, 0, 2), (1, 2), (0, 4), (0, 0, 3), (4, 0), (1, 0, 1), (0, 1, 0, 0),
)


def static_tree(tree_size: int, depth: int) -> list[tuple[int, ...]]:
    """The first ``tree_size`` paths of MEDUSA_CHOICES no deeper than ``depth``."""
    return [path for path in MEDUSA_CHOICES if len(path) <= depth][:tree_size]


class MedusaDrafter(Drafter):
    """Fills the static tree with the heads' top tokens on the target's feature (read from ``target``'s forwards)."""

    source = "medusa"
    partial_verify = True  # it keeps the feature of the accepted path's end only

    def __init__(self, heads: MedusaHeads, target: PrefixCache, sampling: Sampling, tree_size: int) -> None:
        self.heads, self.target, self.sampling, self.tree_size = heads, target, sampling, tree_size
        target.record_hidden = True
        self.feature: Tensor | None = None  # the target's feature whose logits gave the last committed token

    def propose(self, context: list[int], max_depth: int) -> Draft:
        paths = static_tree(self.tree_size, min(self.heads.heads, max_depth))
        if self.feature is None or not paths:  # the first round's forward is the prompt's: nothing to draft from
            return Draft([], [])
        width = 1 + max(max(path) for path in paths)
        with torch.inference_mode():
            logprobs = self.sampling.process(self.heads.logits(self.heads(self.feature))).logprobs
        top = logprobs.topk(min(width, logprobs.shape[-1]), dim=-1)
        values, ids = top.values.tolist(), self.heads.target_ids(top.indices).tolist()
        node_of: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        probs: list[float] = []
        parents: list[int] = []
        for path in paths:
            head, rank = len(path) - 1, path[-1]
            parent = node_of.get(path[:-1]) if head else -1
            # top-k / top-p may leave a head fewer tokens than the path's rank; its subtree goes with it
            if parent is None or rank >= len(values[head]) or values[head][rank] == -math.inf:
                continue
            node_of[path] = len(tokens)
            tokens.append(ids[head][rank])
            probs.append(math.exp(values[head][rank]))
            parents.append(parent)
        if not tokens:
            return Draft([], [])
        return Draft(tokens, probs, parents=parents, calls=1)

    def observe(self, outcome: Outcome) -> None:
        """Keep the target's feature at the accepted path's end (the root's when nothing was accepted)."""
        hidden = self.target.last_hidden
        unseen = len(hidden) - len(outcome.draft.tokens)
        path = outcome.verdict.accepted_path
        self.feature = hidden[unseen + path[-1]] if path else hidden[unseen - 1]


def typical_verdict(parents: list[int], tokens: list[int], target_logprobs: Tensor, epsilon: float, delta: float,
                    sampling: Sampling) -> Verdict:
    """Medusa's typical acceptance of a tree (row u + 1 of ``target_logprobs``: the processed target after node u)."""
    p = target_logprobs.double().exp()
    entropy = -(p * target_logprobs.double()).nan_to_num().sum(-1)  # 0 * -inf counts 0
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    checks: dict[int, NodeCheck] = {}
    score: dict[int, float] = {-1: 0.0}  # accepted nodes (and the root): summed log p along their path
    for node, (parent, token) in enumerate(zip(parents, tokens)):
        if parent in score:
            prob = float(p[parent + 1, token])
            checks[node] = NodeCheck(prob, prob > float(threshold[parent + 1]))
            if checks[node].accepted:
                score[node] = score[parent] + math.log(prob)
    depths = node_depths(parents)
    end = max(score, key=lambda n: (depths[n] if n >= 0 else 0, score[n]))
    path: list[int] = []
    at = end
    while at >= 0:
        path.insert(0, at)
        at = parents[at]
    # as in the shared verifier's record, only the winning path's nodes count as accepted
    checks = {node: replace(check, accepted=check.accepted and node in path) for node, check in checks.items()}
    row = target_logprobs[end + 1]
    # Medusa's removal is p < threshold: the argmax (p >= exp(-H) >= threshold, delta <= 1) always stays
    typical = row.masked_fill(p[end + 1] < threshold[end + 1], -math.inf).float()
    return Verdict(path, checks, sampling.choose(typical), end in parents)


def medusa(ctx: DecodeContext, typical: bool = False) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    target = PrefixCache(ctx.model)
    heads = shipped_or_named_head(ctx.params["drafter"], ctx.model, SHIPPED_HEADS, MedusaHeads)
    drafter = MedusaDrafter(heads, target, sampling, ctx.params["tree_size"])
    rule = None
    if typical:
        epsilon, delta = ctx.params["epsilon"], ctx.params["delta"]
        rule = lambda parents, tokens, logprobs: typical_verdict(parents, tokens, logprobs, epsilon, delta, sampling)  # noqa: E731
    return speculative_rounds(ctx, drafter, sampling, target, rule=rule)


def medusa_typical(ctx: DecodeContext) -> Iterator[Event]:
    return medusa(ctx, typical=True)


PARAMS = (
    Param("drafter", "str", "", "Folder of trained Medusa heads (engine.offline.train_drafter --head medusa); empty "
          "= the heads shipped for the model.", loads_files=True),
    Param("tree_size", "int", 20, f"Nodes of the static tree: the first paths of Medusa-style top-i choices "
          f"(at most {len(MEDUSA_CHOICES)}).", 1, len(MEDUSA_CHOICES), limit="draft_tokens"),
)
SPEC = register(
    DecoderSpec(
        name="medusa",
        family="speculative",
        summary="Medusa: trained heads on the target's last hidden state propose the next tokens at once; a static "
        "tree of their top choices, verified in one tree-attention forward (exact).",
        params=(*PARAMS, *SAMPLING_PARAMS),
        run=medusa,
        lossless=True,
    )
)
TYPICAL_SPEC = register(
    DecoderSpec(
        name="medusa_typical",
        family="speculative",
        summary="Medusa with typical acceptance (lossy): a draft is kept when the target's p exceeds "
        "min(epsilon, delta * exp(-entropy)); the longest such path wins.",
        params=(
            *PARAMS,
            Param("epsilon", "float", 0.09, "Typical acceptance's hard threshold (Medusa's posterior_threshold).",
                  0.0, 1.0),
            Param("delta", "float", 0.3, "Typical acceptance's entropy-scaled threshold factor (Medusa's "
                  "posterior_alpha).", 0.0, 1.0),
            *SAMPLING_PARAMS,
        ),
        run=medusa_typical,
        lossless=False,
    )
)
