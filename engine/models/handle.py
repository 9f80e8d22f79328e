"""One wrapper API over any loaded causal LM: encode, decode, and forward passes with a KV cache."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from transformers import DynamicCache

from engine.attention import use_explorer_attention
from engine.models.errors import ModelError  # noqa: F401 (its users import it from here too)
from engine.limits import check_run
from engine.models.prompt_formats import CONFIG_KEY, PromptFormat, format_named


@dataclass
class ForwardResult:
    logits: torch.Tensor  # float32, [batch, tokens, vocab]
    attentions: tuple[torch.Tensor, ...] | None  # per layer [batch, heads, tokens, keys] when asked for
    hidden: torch.Tensor | None = None  # [batch, tokens, hidden]: what the LM head read, when asked for


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    source: str
    details: dict[str, Any] = field(default_factory=dict)
    processor: Any = None  # a vision-language model's processor (images -> image tokens and pixel inputs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype_name(self) -> str:
        """The weights' dtype as ``load_model`` takes it, such as ``"float32"``."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @cached_property
    def keeps_logits(self) -> bool:
        """Whether the model's forward can compute the logits of its last positions only (``logits_to_keep``)."""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @property
    def num_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def context_length(self) -> int | None:
        """Positions the model reads at most, from its config (None where the config names no limit)."""
        config = self.model.config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def prompt_format(self) -> PromptFormat | None:
        """The prompt format the model's config declares (its folder's ``prompt_format``), if any."""
        return format_named(getattr(self.model.config, CONFIG_KEY, None))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def eos_token_ids(self) -> set[int]:
        """EOS ids from the generation config and the tokenizer, as ``generate`` uses them."""
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def encode(self, prompt: str, chat: bool = False, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the prompt; with ``chat`` the tokenizer's chat template wraps it as a user turn, after the
        ``history`` of earlier (user, assistant) turns."""
        if chat:
            if not self.has_chat_template:
                raise ModelError(f"{self.name} has no chat template; run without chat formatting")
            turns = [{"role": role, "content": text} for turn in history
                     for role, text in zip(("user", "assistant"), turn, strict=True)]
            ids = self.tokenizer.apply_chat_template(
                [*turns, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        if history:
            raise ModelError("earlier chat turns need chat formatting")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ModelError("the prompt is empty after tokenisation; type at least one character")
        return [int(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """Display text of one token (byte fragments of a multi-byte character decode to U+FFFD)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def use_explorer_attention(self) -> None:
        """Switch to the explorer's registered attention function: it returns weights and runs attention hooks."""
        use_explorer_attention(self.model)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache | None = None,
        *,
        attention: bool = False,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
        hidden: bool | tuple[int, ...] = False,
        keep: int = 0,
    ) -> ForwardResult:
        """Run new tokens through the model, extending ``cache`` in place.

        ``inputs`` are extra model inputs of this forward (a VLM prefill's pixel values; ``inputs_embeds`` runs
        instead of ``input_ids``, which then only count the positions: PPD's trained prompt tokens). ``hidden`` also returns
        the last hidden states (after the final norm), from the same forward; a tuple of ``hidden_states`` indices returns
        those layers' states concatenated along the last dimension instead (EAGLE-3's fused features). ``keep`` > 0
        returns the logits of the last ``keep`` positions only, where the model allows it (the LM head over every
        position of a long prompt costs a prefill as much as a few layers). Inside a run that was cancelled or
        used its time, raises engine.limits.RunStopped instead of calling the model.
        """
        check_run()
        if attention:
            self.use_explorer_attention()
        out = self.model(
            input_ids=None if "inputs_embeds" in (inputs or {}) else input_ids.to(self.device),
            past_key_values=cache,
            use_cache=cache is not None,
            position_ids=position_ids,
            attention_mask=attention_mask,
            output_attentions=attention,
            output_hidden_states=bool(hidden),
            return_dict=True,
            **({"logits_to_keep": keep} if keep and self.keeps_logits else {}),
            **(inputs or {}),
        )
        return ForwardResult(logits=out.logits.float(), attentions=out.attentions if attention else None,
                             hidden=_hidden_of(out, hidden))

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "name": self.name,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", ""),
            "layers": self.num_layers,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype_name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **self.details,
        }


def _hidden_of(out: Any, hidden: bool | tuple[int, ...]) -> torch.Tensor | None:
    """The states a forward was asked for: the last, or the named layers' side by side (read only when asked:
    a model without hidden states, such as a test's oracle, still serves every other forward)."""
    if not hidden:
        return None
    if hidden is True:
        return out.hidden_states[-1]
    return torch.cat([out.hidden_states[index] for index in hidden], dim=-1)
