"""EAGLE (Li et al. 2024) with EAGLE-2's dynamic draft tree: a trained feature head drafts from the target's features.

The head (:mod:`engine.speculative.feature_head`) reads the target's last hidden state ``f_t`` and the next token,
and predicts the next feature, whose LM-head logits give the draft distribution. The target's verify forward returns
its hidden states too (one forward: no extra target pass), so after each round the head knows the true features of
every committed token but the bonus one, which it drafts from.

Each round grows EAGLE-2's dynamic tree (:mod:`engine.speculative.eagle_tree`, speculative.md §6) and the
target verifies it with tree attention; greedy output equals greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.models.registry import ASSET_MODELS_DIR
from engine.params import Param
from engine.speculative.eagle_tree import BRANCHING, DEPTH, TREE_SIZE, tree_rounds
from engine.speculative.feature_head import FeatureHead, shipped_or_named_head
from engine.speculative.rounds import SAMPLING_PARAMS

# The heads shipped in assets/, by the target model they were trained for.
SHIPPED_HEADS = {"smollm2-135m-instruct": ASSET_MODELS_DIR / "eagle-smollm2"}


def eagle(ctx: DecodeContext) -> Iterator[Event]:
    return tree_rounds(ctx, shipped_or_named_head(ctx.params["drafter"], ctx.model, SHIPPED_HEADS, FeatureHead))


SPEC = register(
    DecoderSpec(
        name="eagle",
        family="speculative",
        summary="EAGLE-2: a trained head drafts from the target's own features; a dynamic tree grown by draft "
        "confidence, verified in one tree-attention forward.",
        params=(
            Param("drafter", "str", "", "Folder of a trained EAGLE head (engine.offline.train_drafter); empty = the "
                  "head shipped for the model.", loads_files=True),
            TREE_SIZE,
            DEPTH,
            BRANCHING,
            *SAMPLING_PARAMS,
        ),
        run=eagle,
        lossless=True,
    )
)
