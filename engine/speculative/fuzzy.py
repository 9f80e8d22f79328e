"""EasySpec's layer-parallel ("fuzzy") draft forward on one device (Wu et al., NeurIPS 2025, arXiv 2502.02493).

Consecutive decoder layers are grouped; the layers of a group all read the group's input hidden state and their
residual updates are summed, ``h' = h + sum_i (layer_i(h) - h)``, as if each ran on its own device at the same
time. The view shares every weight and every KV-cache slot with the model it comes from (each layer keeps its own
``layer_idx``), so the exact model can re-run the accepted tokens over the same cache afterwards (EasySpec's bonus
calibration). Each layer's call is timed: the theoretical parallel time of a forward counts only the slowest layer
of each group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from engine.models.handle import LoadedModel
from engine.speculative.truncated import shallow_module_copy


@dataclass
class LayerClock:
    """Seconds spent in the grouped layers, as run one after another and as they would run in parallel."""

    sequential: float = 0.0
    parallel: float = 0.0


class ParallelLayers(nn.Module):
    """Decoder layers that all read the same input; their residual updates are summed."""

    def __init__(self, layers: list[nn.Module], clock: LayerClock) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.attention_type = getattr(layers[0], "attention_type", None)  # Gemma 3 picks its mask by it
        self.clock = clock

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        update = torch.zeros_like(hidden_states)
        slowest = 0.0
        for layer in self.layers:
            began = time.perf_counter()
            update += layer(hidden_states, *args, **kwargs) - hidden_states
            seconds = time.perf_counter() - began
            slowest = max(slowest, seconds)
            self.clock.sequential += seconds
        self.clock.parallel += slowest
        return hidden_states + update


def layer_groups(layer_types: list[str], group: int) -> list[list[int]]:
    """Consecutive layers in groups of at most ``group``; a group never mixes attention types (their masks differ)."""
    groups: list[list[int]] = []
    for index, kind in enumerate(layer_types):
        if groups and len(groups[-1]) < group and layer_types[groups[-1][0]] == kind:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def fuzzy_view(model: LoadedModel, group: int) -> tuple[LoadedModel, LayerClock]:
    """``model`` with its layers run in parallel groups of ``group``, and the clock its layers report to."""
    causal_lm = model.model
    base = causal_lm.model
    layers = list(base.layers[: model.num_layers])
    types = list(getattr(causal_lm.config, "layer_types", None) or ["full_attention"] * len(layers))
    clock = LayerClock()
    draft_base = shallow_module_copy(base)
    # config.num_hidden_layers keeps the layer count: the cache has one slot per layer, the loop runs every group.
    draft_base._modules["layers"] = nn.ModuleList(
        ParallelLayers([layers[i] for i in indices], clock) for indices in layer_groups(types, group)
    )
    draft_lm = shallow_module_copy(causal_lm)
    draft_lm._modules["model"] = draft_base
    name = f"{model.name} (layers in parallel groups of {group})"
    return LoadedModel(name, draft_lm, model.tokenizer, model.source, {**model.details, "parallel_group": group}), clock
