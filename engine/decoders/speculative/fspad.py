"""FSPAD (Gui et al. 2024, arXiv 2408.15562): EAGLE-2's dynamic draft tree drafted by FSPAD's head.

The head (:mod:`engine.speculative.fspad_head`) is EAGLE's with feature sampling (the token embedding gates the
target's feature before the decoder layer) and partial alignment (its output's logit half feeds the LM head, its
feature half is what a drafted node's children read). Everything else is the `eagle` decoder's: the same tree growth
(:class:`~engine.speculative.eagle_tree.EagleDrafter`), parameters and shared verifier, so greedy output equals
greedy decoding and sampling follows the processed target exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.models.registry import ASSET_MODELS_DIR
from engine.params import Param
from engine.speculative.eagle_tree import BRANCHING, DEPTH, TREE_SIZE, tree_rounds
from engine.speculative.feature_head import shipped_or_named_head
from engine.speculative.fspad_head import FspadHead
from engine.speculative.rounds import SAMPLING_PARAMS

# The heads shipped in assets/, by the target model they were trained for.
SHIPPED_HEADS = {"smollm2-135m-instruct": ASSET_MODELS_DIR / "fspad-smollm2"}


def fspad(ctx: DecodeContext) -> Iterator[Event]:
    return tree_rounds(ctx, shipped_or_named_head(ctx.params["drafter"], ctx.model, SHIPPED_HEADS, FspadHead))


SPEC = register(
    DecoderSpec(
        name="fspad",
        family="speculative",
        summary="FSPAD: EAGLE-2's dynamic tree drafted by a head trained with feature sampling (the token embedding "
        "gates the target's feature) and partial alignment distillation; verified in one tree-attention forward.",
        params=(
            Param("drafter", "str", "", "Folder of a trained FSPAD head (engine.offline.train_drafter --head fspad); "
                  "empty = the head shipped for the model.", loads_files=True),
            TREE_SIZE,
            DEPTH,
            BRANCHING,
            *SAMPLING_PARAMS,
        ),
        run=fspad,
        lossless=True,
    )
)
