"""Pure figure functions: a trace (or part of one) -> plotly Figure or HTML string; no Gradio, no model."""

from ui.figures.common import WINDOW, clip_text, escape_text, escape_token, token_label
from ui.figures.tokens import STEP_TABLE_HEADERS, step_table, token_steps, token_stream_html
from ui.figures.distribution import distribution_figure
from ui.figures.timeline import entropy_figure, entropy_sparkline_html
from ui.figures.attention import attention_figure, attention_layers, attention_steps
from ui.figures.compare import aligned_tokens_html, cost_table, divergence_figure, first_divergence
from ui.figures.sharpness import sharpness_figure
from ui.figures.trees import (
    BEAM_HYPOTHESES_HEADERS, BEAM_HYPOTHESES_TYPES, acceptance_by_depth, acceptance_figure, beam_final_text,
    beam_hypotheses, beam_tree_figure, best_hypothesis, draft_rounds, draft_tree_figure,
)
from ui.figures.lattice import canvas_html, commit_order, diffusion_steps, lattice_figure
from ui.figures.diffusion import (
    DIFFUSION_TABLE_HEADERS, committed_per_step_figure, diffusion_canvas_html, diffusion_step_table, diffusion_summary,
    step_lattice_figure, step_summary,
)
from ui.figures.explore import reprocess_figure, token_tree_figure
from ui.figures.library import RUN_TREE_HEADERS, RUN_TREE_TYPES, run_label, run_tree_rows
