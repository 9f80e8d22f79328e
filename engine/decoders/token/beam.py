"""Beam search with length penalty and early stopping, recording every live, pruned and finished beam.

Follows transformers' beam search step for step so both return the same best sequence and score: at
each step the top ``max(2, 1 + #eos) * num_beams`` continuations are gathered; those that end (EOS or
length budget) among the first ``num_beams`` become finished hypotheses scored ``sum logp / len**lp``;
the best ``num_beams`` unfinished ones carry on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import BeamNode, BeamStep, Event, Output
from engine.params import Param

DEAD = -1.0e9  # score of a slot with no real hypothesis, as in transformers


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # sum of token log-probs
    node: int  # id of its last BeamNode (-1 = the prompt)


def beam_search(ctx: DecodeContext) -> Iterator[Event]:
    num_beams: int = ctx.params["num_beams"]
    length_penalty: float = ctx.params["length_penalty"]
    early_stopping = {"true": True, "false": False, "never": "never"}[ctx.params["early_stopping"]]
    keep = max(2, 1 + len(ctx.eos_token_ids)) * num_beams
    model, budget = ctx.model, ctx.max_new_tokens

    start = time.perf_counter()
    cache = model.new_cache()
    logits = model.forward(torch.tensor([ctx.prompt_ids]), cache, keep=1).logits[:, -1, :]
    cache.batch_repeat_interleave(num_beams)
    logits = logits.expand(num_beams, -1)
    running = [Hypothesis([], 0.0 if b == 0 else DEAD, -1) for b in range(num_beams)]
    finished: list[tuple[float, Hypothesis]] = []
    improvable, next_node = True, 0

    for step in range(budget):
        logprobs = torch.log_softmax(logits, dim=-1)
        vocab = logprobs.shape[-1]
        scores = torch.tensor([h.score for h in running]).unsqueeze(1)
        top_scores, top_index = torch.topk((logprobs + scores).view(-1), k=keep)
        beams, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        ends = [t in ctx.eos_token_ids or step + 1 >= budget for t in tokens]
        top = top_scores.tolist()

        # Finished hypotheses: only the first num_beams candidates may finish, while improvement is possible.
        accepting = improvable and not (len(finished) == num_beams and early_stopping is True)
        new_finished = [j for j in range(num_beams) if ends[j] and accepting]
        normalized = {j: top[j] / ((step + 1) ** length_penalty) for j in new_finished}
        # Next running beams: the best num_beams candidates that did not end.
        alive_scores = torch.tensor([DEAD if e else 0.0 for e in ends]) + top_scores
        chosen = torch.topk(alive_scores, k=num_beams).indices.tolist()

        nodes, hyps = [], []
        for j in range(keep):
            parent = running[beams[j]]
            status = "finished" if j in normalized else ("live" if j in chosen and not ends[j] else "pruned")
            nodes.append(
                BeamNode(
                    id=next_node + j,
                    parent=parent.node,
                    token_id=tokens[j],
                    token_logprob=logprobs[beams[j], tokens[j]],
                    score=top[j],
                    status=status,
                    normalized_score=normalized[j] if j in normalized else None,
                )
            )
            hyps.append(Hypothesis(parent.tokens + [tokens[j]], top[j], next_node + j))
        next_node += keep
        finished = sorted(finished + [(normalized[j], hyps[j]) for j in new_finished], key=lambda f: -f[0])[:num_beams]
        running = [Hypothesis(hyps[j].tokens, float(alive_scores[j]), hyps[j].node) for j in chosen]
        yield BeamStep(step=step, nodes=nodes, seconds=time.perf_counter() - start)

        improvable = improvable and _can_improve(running[0].score, finished, num_beams, step + 1, budget, length_penalty, early_stopping)
        if not improvable or (len(finished) == num_beams and early_stopping is True) or all(ends):
            break
        start = time.perf_counter()
        cache.reorder_cache(torch.tensor([beams[j] for j in chosen]))
        logits = model.forward(torch.tensor([[tokens[j]] for j in chosen]), cache).logits[:, -1, :]

    best_score, best = finished[0]
    yield Output(token_ids=best.tokens, score=best_score)


def _can_improve(best_running: float, finished, num_beams: int, length: int, budget: int, length_penalty: float, early_stopping) -> bool:
    """Could the best running beam still beat the worst kept hypothesis? (transformers' heuristic)"""
    if len(finished) < num_beams:
        return True
    hypothetical = budget if early_stopping == "never" and length_penalty > 0.0 else length
    return best_running / (hypothetical**length_penalty) > finished[-1][0]


SPEC = register(
    DecoderSpec(
        name="beam",
        family="token",
        summary="Beam search: keep the num_beams best partial sequences; records the whole beam tree.",
        params=(
            Param("num_beams", "int", 4, "Number of beams kept at every step.", 1, 64, limit="beams"),
            Param("length_penalty", "float", 1.0, "Finished score = sum log p / length**length_penalty (> 0 favours longer).", -5.0, 5.0),
            Param(
                "early_stopping",
                "choice",
                "false",
                "true: stop once num_beams hypotheses are finished; false: stop when the best running beam cannot win (heuristic); never: canonical search.",
                choices=("false", "true", "never"),
            ),
        ),
        run=beam_search,
    )
)
