"""A draft model made of the target's first N decoder layers plus its final norm and head, sharing weights.

The view is a shallow copy of the causal-LM module and of its base model, with the kept layers and a config saying
N layers: transformers' Llama-family and Gemma 3 text models run ``self.layers[: config.num_hidden_layers]`` and pick
each layer's attention type from ``config.layer_types``, so no weight is copied and the view keeps its own KV cache.
:func:`layer_view` builds any such view (the layer-skipping drafter keeps a subset of layers in engine/speculative/skip.py).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from engine.models.handle import LoadedModel


def truncated_model(model: LoadedModel, num_layers: int) -> LoadedModel:
    """The first ``num_layers`` layers of ``model`` (plus final norm and LM head) as a model of their own."""
    total = model.num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be between 1 and {total} (the target's layer count), got {num_layers}")
    name = f"{model.name}[:{num_layers} layers]"
    return layer_view(model, range(num_layers), name, {"draft_layers": num_layers}, purpose="draft_layers")


def layer_view(
    model: LoadedModel, kept: Sequence[int], name: str, details: Mapping[str, Any], purpose: str
) -> LoadedModel:
    """``model`` running only its decoder layers ``kept`` (plus final norm and LM head), sharing every weight.

    transformers indexes the KV cache by each attention module's ``layer_idx``, so a kept layer whose position in
    the view differs from its own index runs as a shallow copy renumbered to its new position; ``details`` join
    the model's details, and ``purpose`` names the feature in the error for a model without ``model.model.layers``.
    """
    causal_lm = model.model
    base = getattr(causal_lm, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ValueError(
            f"{purpose} needs a Llama- or Gemma-style model (model.model.layers); {type(causal_lm).__name__} has none"
        )
    config = copy.deepcopy(causal_lm.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[layer] for layer in kept]
    draft_base = shallow_module_copy(base)
    draft_base.config = config
    draft_base._modules["layers"] = nn.ModuleList(
        base.layers[layer] if layer == index else _renumbered(base.layers[layer], index)
        for index, layer in enumerate(kept)
    )
    draft_lm = shallow_module_copy(causal_lm)
    draft_lm.config = config
    draft_lm._modules["model"] = draft_base
    return LoadedModel(name, draft_lm, model.tokenizer, model.source, {**model.details, "draft_of": model.name, **details})


def shallow_module_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters and children; replacing a child of the copy leaves ``module`` whole."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def _renumbered(layer: nn.Module, index: int) -> nn.Module:
    """A shallow copy of a decoder layer whose attention reads and writes cache layer ``index``."""
    clone = shallow_module_copy(layer)
    attention = shallow_module_copy(layer._modules["self_attn"])
    attention.layer_idx = index
    clone._modules["self_attn"] = attention
    if hasattr(clone, "layer_idx"):  # Gemma 3 layers keep their own copy of the index
        clone.layer_idx = index
    return clone
