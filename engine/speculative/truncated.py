"""A draft model made of the target's first N decoder layers plus its final norm and head, sharing weights.

The view is a shallow copy of the causal-LM module and of its base model, with a config saying N layers:
transformers' Llama-family and Gemma 3 text models run ``self.layers[: config.num_hidden_layers]`` and pick each
layer's attention type from ``config.layer_types``, so no weight is copied and the view keeps its own KV cache.
"""

from __future__ import annotations

import copy

from torch import nn

from engine.models.handle import LoadedModel


def truncated_model(model: LoadedModel, num_layers: int) -> LoadedModel:
    """The first ``num_layers`` layers of ``model`` (plus final norm and LM head) as a model of their own."""
    total = model.num_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be between 1 and {total} (the target's layer count), got {num_layers}")
    causal_lm = model.model
    base = getattr(causal_lm, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ValueError(
            f"draft_layers needs a Llama- or Gemma-style model (model.model.layers); {type(causal_lm).__name__} has none"
        )
    config = copy.deepcopy(causal_lm.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])
    draft_base = _shallow_module_copy(base)
    draft_base.config = config
    draft_lm = _shallow_module_copy(causal_lm)
    draft_lm.config = config
    draft_lm._modules["model"] = draft_base
    details = {**model.details, "draft_of": model.name, "draft_layers": num_layers}
    return LoadedModel(f"{model.name}[:{num_layers} layers]", draft_lm, model.tokenizer, model.source, details)


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # replacing a child of the clone must not touch the original
    return clone
