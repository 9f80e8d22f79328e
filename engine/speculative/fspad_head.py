"""FSPAD's head (Gui et al. 2024, arXiv 2408.15562, speculative.md §10): EAGLE's feature head with feature sampling
and partial alignment distillation.

The paper describes both parts in a sentence each; this port follows the authors' code (github.com/Luc4Gui/FSPAD,
``eagle/model/cnets_fspad.py`` and ``eagle/train/main_fspad.py``, written on EAGLE's):

* **Feature sampling.** After EAGLE's ``x = FC([e; f_t])`` (``e`` the embedding of ``x_{t+1}``), a residual gated MLP
  whose gate reads the token embedding and whose up projection reads the normalised ``x``:
  ``x + down(act(gate(e)) * up(norm(x)))``. The token gates the feature in the MLP's intermediate width (the paper's
  "high-dimensional space"), so the head knows which token the target actually emitted from its uncertain feature.
* **Partial alignment.** The decoder layer's MLP projects to 2H instead of H and its residual is doubled, so the
  layer ends in two halves that share attention and the MLP's gate and up projections: ``[h + down_a(z); h +
  down_b(z)]``. Only the second half is aligned with the target's next feature (the smooth-L1 regression) and read
  back at drafted positions; the first half alone feeds the frozen LM head (the cross-entropy). The regression no
  longer pulls on the very feature the logits are read from.

The loss is then EAGLE's (``train_drafter.eagle_loss``, weights as in the authors' code: 1 for the regression, 0.1 for
the classification), through :meth:`FspadHead.next_feature` and :meth:`FspadHead.logits`. Where this port differs:
the classification is the cross-entropy against the target's own next token, as this project's EAGLE head is
trained (the authors' code uses the target's soft distribution; on self-distilled greedy answers the token is that
distribution's argmax), and the decoder layer is the target's own class with its input norm, as in
:class:`FeatureHead` (the authors' first layer skips it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from engine.models.handle import LoadedModel
from engine.speculative.feature_head import FeatureHead


class _TwoHalves(nn.Module):
    """A decoder layer's MLP with its down projection widened to 2H, returning its halves stacked [2, ..., H]: the
    layer's own residual add then broadcasts its H-wide residual over both, which is FSPAD's ``cat(h, h) + down(z)``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        down = mlp.down_proj
        mlp.down_proj = nn.Linear(down.in_features, 2 * down.out_features, bias=down.bias is not None)
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x).unflatten(-1, (2, -1)).movedim(-2, 0)


class FspadHead(FeatureHead):
    """FSPAD's head for ``target``; ``draft_vocab`` (target ids) restricts its logits to those tokens.

    Its output is [..., 2H]: the logit half then the feature half.
    """

    kind, title = "fspad", "FSPAD"

    def __init__(self, target: LoadedModel, draft_vocab: Tensor | None = None) -> None:
        super().__init__(target, draft_vocab)
        config = target.model.config.get_text_config()
        # The sampler is an MLP of the target's own kind (gate, up, down, activation), fed differently.
        self.sampler = type(self.layer.mlp)(config)
        self.sampler_norm = nn.RMSNorm(self.hidden_size, eps=config.rms_norm_eps)
        self.layer.mlp = _TwoHalves(self.layer.mlp)
        self.match_target(target)

    @classmethod
    def from_config(cls, target: LoadedModel, config: dict[str, Any], draft_vocab: Tensor | None) -> FspadHead:
        return cls(target, draft_vocab)

    def sample(self, x: Tensor, embedded: Tensor) -> Tensor:
        """Feature sampling: ``x`` gated by the token embedding in the sampler's intermediate width, residually."""
        mlp = self.sampler
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(embedded)) * mlp.up_proj(self.sampler_norm(x)))

    def forward(
        self, token_ids: Tensor, features: Tensor, position_ids: Tensor, mask: Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> Tensor:
        """The logit half and the predicted next feature [B, n, 2H] from tokens x_{t+1} [B, n] and features f_t
        [B, n, H] (the target's, or a drafted node's :meth:`next_feature`); ``mask`` as :meth:`FeatureHead.forward`'s."""
        embedded = self._frozen[0](token_ids).to(features.dtype)
        x = self.sample(self.fc(torch.cat([embedded, features], dim=-1)), embedded)
        halves = self.layer(x, attention_mask=mask, position_ids=position_ids, cache=cache,
                            use_cache=cache is not None, position_embeddings=self.rotary(x, position_ids))
        return torch.cat(tuple(halves), dim=-1)

    def logits(self, output: Tensor) -> Tensor:
        return super().logits(output[..., : self.hidden_size])

    def next_feature(self, output: Tensor) -> Tensor:
        return output[..., self.hidden_size:]
