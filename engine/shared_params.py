"""Parameter sets several decoders declare, each defined once here so that no decoder imports another.

Only ``engine.params`` below it: any layer may read these schemas.
"""

from engine.params import Param

# The processing pipeline's stages (engine/processing.py), as the sampling decoders and their relatives take them.
PIPELINE_PARAMS = (
    Param("temperature", "float", 1.0, "Divide logits by T before truncation (T < 1 sharpens, T > 1 flattens).", 0.01, 10.0),
    Param("top_k", "int", 0, "Keep the k most probable tokens (0 = off).", 0, 1_000_000),
    Param("top_p", "float", 1.0, "Nucleus: keep the smallest set with mass >= top_p (1 = off).", 0.0, 1.0),
    Param("min_p", "float", 0.0, "Keep tokens with p >= min_p * p_max (0 = off).", 0.0, 1.0),
    Param("typical_p", "float", 1.0, "Locally typical sampling: keep tokens whose surprisal is closest to the entropy until this mass (1 = off).", 0.001, 1.0),
    Param("epsilon", "float", 0.0, "Epsilon sampling: drop tokens with p < epsilon (0 = off; paper: 3e-4 to 9e-4).", 0.0, 0.999),
    Param("eta", "float", 0.0, "Eta sampling: drop tokens with p < min(eta, sqrt(eta) * exp(-H)) (0 = off).", 0.0, 0.999),
    Param("top_h", "float", 0.0, "Top-H: keep the largest top set whose cumulative entropy <= top_h * H (0 = off; typical 0.3-0.5).", 0.0, 1.0),
    Param("repetition_penalty", "float", 1.0, "Divide positive / multiply negative logits of tokens already in the context (1 = off).", 0.01, 10.0),
)

# LLaDA's schedule, shared with dKV-Cache (which keeps it and changes only how the logits are computed); REMASKING
# maps each ``remasking`` choice to the confidence engine/diffusion/unmask.py ranks proposals by.
REMASKING = {"low_confidence": "probability", "random": "random"}
SCHEDULE_PARAMS = (
    Param("steps", "int", 0, "Denoising steps over the whole canvas; 0 = gen_length (one token per step).", 0, 4096,
          sets_parallelism=True),
    Param("remasking", "choice", "low_confidence", "Which proposals stay: the most confident, or random ones.",
          choices=tuple(REMASKING)),
)

# How deep the shared draft-and-verify rounds (engine/speculative/rounds.py) let each round's draft go.
DRAFT_LENGTHS = ("adaptive", "fixed")
DRAFT_LENGTH_PARAMS = (
    Param("draft_length", "choice", "adaptive", "adaptive: each round drafts only as deep as pays on this machine "
          "(measured verify cost x acceptance by depth), down to no draft; fixed: the decoder's own length every "
          "round. Lookahead and PEARL, whose rounds are all or nothing, run them only while they pay more than plain "
          "steps.", choices=DRAFT_LENGTHS),
)
