"""Cross-passage attention (REFRAG's premise, Lin et al. 2025): over retrieved passages attention is nearly
block-diagonal, so most attention across passages could be skipped. Read from a run's recorded attention maps and
its ``PromptPassages`` event, with numpy alone, so a stored trace replays with no model.

Two measures, per captured layer, on the head-reduced weights the capture kept (the mean over heads by default):

* each output token: the attention of the query that chose it (the last row of its step's map) split into its most
  attended passage, the other passages, the question, the rest of the prompt (chat template, BOS) and the output
  so far; these five shares sum to 1. "Within" is the top passage's share of the attention on passages.
* the prompt's own passage tokens (the prefill map, step 0): of a passage token's attention on passage tokens, the
  share on each passage; the block matrix averages it over the tokens of each passage (rows sum to 1). Causal
  attention lets the first passage see only itself, so the within-passage summary averages the later passages'
  tokens, beside what uniform attention over the passage tokens each one sees would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.event_arrays import attention_array
from engine.events import AttentionMap, PromptPassages
from engine.trace import Trace
from ui.figures.attention import layer_name
from ui.figures.common import clip_text, empty_figure, escape_token, style_figure

PARTS = ("top passage", "other passages", "question", "rest of the prompt", "output so far")
PART_COLORS = ("rgb(0, 160, 110)", "rgb(239, 85, 59)", "rgb(99, 110, 250)", "rgb(160, 160, 160)",
               "rgb(235, 175, 35)")
PREVIEW_CHARS = 48  # a passage's opening words in the hover
NO_PASSAGES = (
    "This run has no marked passages with recorded attention.<br>"
    "Capture attention (layers <b>all</b> shows every layer) on a prompt of lines that start with "
    "<b>Passage</b>,<br>then a line that starts with <b>Question:</b> (the capture's passage and question markers)."
)


@dataclass(frozen=True)
class PassageAttention:
    """The measures of one run; ``steps`` are the decoder steps with a map (one output token each)."""

    passages: PromptPassages
    head_reduction: str
    layers: list[int]
    steps: list[int]
    parts: np.ndarray  # [steps, layers, PARTS]: the choosing query's attention shares
    top: np.ndarray  # [steps, layers]: index of the passage it attends most (-1: no attention on passages)
    block: np.ndarray | None  # [layers, passages, passages]: prefill passage -> passage shares; None without map
    within_prefill: np.ndarray | None  # [layers]: mean own-passage share of the passage tokens that can cross
    uniform_prefill: float  # that share under uniform attention over the visible passage tokens (nan: one passage)

    @property
    def within(self) -> np.ndarray:
        """[steps, layers]: the top passage's share of the attention on passages (nan without any)."""
        on_passages = self.parts[..., 0] + self.parts[..., 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(on_passages > 0, self.parts[..., 0] / on_passages, np.nan)


def has_passage_attention(trace: Trace) -> bool:
    """Whether the run recorded marked passages and attention maps (its views include the cross-passage one)."""
    kinds = {event.kind for event in trace.events}
    return PromptPassages.kind in kinds and AttentionMap.kind in kinds


def passage_attention(trace: Trace) -> PassageAttention | None:
    """The run's cross-passage measures, or None without a ``PromptPassages`` event or attention maps."""
    passages = next((e for e in trace.events if isinstance(e, PromptPassages)), None)
    maps = [e for e in trace.events if isinstance(e, AttentionMap) and e.name == "attention"]
    if passages is None or not passages.passages or not maps:
        return None
    maps = [m for m in maps if m.layers == maps[0].layers]
    prompt_length = len(trace.prompt_token_ids)
    parts, top = [], []
    for event in maps:
        weights = attention_array(event)[:, -1, :]  # [layers, keys]: the query that chose the step's token
        mass = weights @ _membership(passages, prompt_length, weights.shape[-1])
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = mass / mass.sum(axis=-1, keepdims=True)
        count = len(passages.passages)
        on_passages = shares[:, :count]
        best = on_passages.max(axis=-1)
        parts.append(np.stack([best, on_passages.sum(axis=-1) - best, *shares[:, count:].T], axis=-1))
        top.append(np.where(on_passages.sum(axis=-1) > 0, on_passages.argmax(axis=-1), -1))
    prefill = next((m for m in maps if m.step == 0), None)
    block, within = _prefill_blocks(prefill, passages, prompt_length) if prefill is not None else (None, None)
    return PassageAttention(passages, maps[0].head_reduction, list(maps[0].layers), [m.step for m in maps],
                            np.array(parts), np.array(top), block, within, _uniform_within(passages))


def _membership(passages: PromptPassages, prompt_length: int, keys: int) -> np.ndarray:
    """[keys, passages + 3] one-hot: each passage, the question, the rest of the prompt, the output."""
    count = len(passages.passages)
    owner = np.full(keys, count + 1)  # the rest of the prompt
    owner[prompt_length:] = count + 2
    for index, (start, stop) in enumerate(passages.passages):
        owner[start:stop] = index
    owner[slice(*passages.question)] = count
    return np.eye(count + 3, dtype=np.float32)[owner]


def _prefill_blocks(event: AttentionMap, passages: PromptPassages,
                    prompt_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The block matrix per layer and the mean own-passage share of the tokens of the second passage onwards."""
    weights = attention_array(event)  # [layers, queries, keys]
    member = _membership(passages, prompt_length, weights.shape[-1])[:, : len(passages.passages)]
    rows = {position: row for row, position in enumerate(event.query_positions)}
    count = len(passages.passages)
    block = np.full((weights.shape[0], count, count), np.nan)
    crossing = []  # per token of a later passage: [layers] own share
    for index, (start, stop) in enumerate(passages.passages):
        kept = [rows[p] for p in range(start, stop) if p in rows]
        if not kept:
            continue
        mass = weights[:, kept, :] @ member  # [layers, tokens, passages]
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = mass / mass.sum(axis=-1, keepdims=True)
        block[:, index] = np.nanmean(shares, axis=1)
        if index:
            crossing.append(shares[:, :, index])
    within = np.nanmean(np.concatenate(crossing, axis=1), axis=1) if crossing else np.full(weights.shape[0], np.nan)
    return block, within


def _uniform_within(passages: PromptPassages) -> float:
    """Mean own-passage share, over the tokens of the second passage onwards, of uniform attention on the passage
    tokens each can see (its own passage so far and every earlier passage)."""
    shares, before = [], 0
    for index, (start, stop) in enumerate(passages.passages):
        if index:
            own = np.arange(1, stop - start + 1)
            shares.extend(own / (before + own))
        before += stop - start
    return float(np.mean(shares)) if shares else float("nan")


def passage_labels(trace: Trace, passages: PromptPassages) -> list[str]:
    """``P1 “opening words…”`` per passage, escaped."""
    ids = trace.prompt_token_ids
    return [f"P{i + 1} “{clip_text(trace.text_of(ids[a:b]).strip(), PREVIEW_CHARS)}”"
            for i, (a, b) in enumerate(passages.passages)]


def passages_figure(trace: Trace, step: int, layer_index: int = -1) -> go.Figure:
    """Left: where the query that chose output ``step`` looks, per layer. Middle: the top passage's share of the
    attention on passages, layer x step. Right: the prefill block matrix of layer ``layer_index`` (a slider picks
    another layer)."""
    data = passage_attention(trace)
    if data is None:
        return empty_figure(NO_PASSAGES)
    names = [layer_name(layer) for layer in data.layers]
    if not -len(names) <= layer_index < len(names):
        raise ValueError(f"layer_index {layer_index} is out of range: the maps keep {len(names)} layer(s)")
    chosen = layer_index % len(names)
    labels = passage_labels(trace, data.passages)
    short = [f"P{i + 1}" for i in range(len(labels))]
    fig = make_subplots(rows=1, cols=3, column_widths=[0.28, 0.42, 0.30], horizontal_spacing=0.09, subplot_titles=(
        f"output {step}: the choosing query's attention", "top passage's share of passage attention",
        "prefill: passage tokens' passage attention"))
    _add_parts(fig, data, names, step)
    _add_steps(fig, data, names, step)
    _add_blocks(fig, data, names, short, labels, chosen)
    fig.update_layout(barmode="stack", coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 1,
                                                  "colorbar": {"title": {"text": "share"}, "len": 0.8}})
    fig.update_xaxes(title_text="share of attention", range=[0, 1], row=1, col=1)
    fig.update_xaxes(title_text="output position (decoder step)", row=1, col=2)
    fig.update_xaxes(title_text="attended passage", row=1, col=3)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=2)
    fig.update_yaxes(title_text="attending passage", autorange="reversed", row=1, col=3)
    style_figure(fig, _title(data, names[chosen], chosen), height=max(480, 330 + 16 * len(names)), clamp=False)
    # the legend below the left panels, the layer slider below the block matrix
    fig.update_layout(margin={"b": 110}, legend={"orientation": "h", "yref": "paper", "y": -0.28, "x": 0,
                                                 "traceorder": "normal"})
    fig.update_annotations(font_size=13)
    return fig


def _add_parts(fig: go.Figure, data: PassageAttention, names: list[str], step: int) -> None:
    if step not in data.steps:
        fig.add_annotation(text=f"no attention map at output {step}", x=0.5, y=0.5, xref="x domain",
                           yref="y domain", showarrow=False)
        return
    row = data.steps.index(step)
    top = [f"P{t + 1}" if t >= 0 else "none" for t in data.top[row]]
    for part, (name, colour) in enumerate(zip(PARTS, PART_COLORS)):
        fig.add_trace(go.Bar(x=data.parts[row, :, part], y=names, orientation="h", name=name, customdata=top,
                             marker_color=colour, legendgroup="parts",
                             hovertemplate=f"%{{y}} · {name}: %{{x:.3f}}<br>top passage %{{customdata}}<extra></extra>"),
                      row=1, col=1)


def _add_steps(fig: go.Figure, data: PassageAttention, names: list[str], step: int) -> None:
    parts = np.moveaxis(data.parts, 0, 1)  # [layers, steps, parts]
    top = np.moveaxis(data.top, 0, 1)[..., None] + 1
    fig.add_trace(go.Heatmap(
        z=np.moveaxis(data.within, 0, 1), x=data.steps, y=names, coloraxis="coloraxis",
        customdata=np.concatenate([top, parts], axis=-1),
        hovertemplate=("output %{x} · %{y}<br>top passage P%{customdata[0]}: %{z:.3f} of passage attention<br>"
                       "passages %{customdata[1]:.3f} + %{customdata[2]:.3f} · question %{customdata[3]:.3f} · "
                       "prompt rest %{customdata[4]:.3f} · output %{customdata[5]:.3f}<extra></extra>"),
        ), row=1, col=2)
    if step in data.steps:
        fig.add_vline(x=step, line_width=2, line_dash="dot", line_color="rgb(239, 85, 59)", row=1, col=2)


def _add_blocks(fig: go.Figure, data: PassageAttention, names: list[str], short: list[str], labels: list[str],
                chosen: int) -> None:
    if data.block is None:
        fig.add_annotation(text="no prefill map (the capture budget ran out?)", x=0.5, y=0.5, xref="x3 domain",
                           yref="y3 domain", showarrow=False)
        return
    hover = [[f"{labels[i]}<br>→ {labels[j]}" for j in range(len(labels))] for i in range(len(labels))]
    first = len(fig.data)
    for index, name in enumerate(names):
        fig.add_trace(go.Heatmap(
            z=data.block[index], x=short, y=short, coloraxis="coloraxis", text=hover, texttemplate="%{z:.2f}",
            hovertemplate=f"{name}<br>%{{text}}<br>share %{{z:.3f}}<extra></extra>", visible=index == chosen,
            name=name), row=1, col=3)
    if len(names) > 1:
        steps = [{"label": name.removeprefix("layer "), "method": "restyle",
                  "args": [{"visible": [True] * first + [i == index for i in range(len(names))]}]}
                 for index, name in enumerate(names)]
        fig.update_layout(sliders=[{"active": chosen, "steps": steps, "x": 0.72, "len": 0.28, "y": -0.22,
                                    "yanchor": "top", "currentvalue": {"prefix": "prefill block matrix: layer "}}])


def _title(data: PassageAttention, layer: str, chosen: int) -> str:
    question = data.passages.question
    asked = f"question at tokens {question[0]}–{question[1] - 1}" if question[1] > question[0] else "no question marker"
    heading = (f"Cross-passage attention (REFRAG): {len(data.passages.passages)} passage(s), {asked} · heads: "
               f"{escape_token(data.head_reduction)}")
    if data.within_prefill is None:
        return heading
    if len(data.passages.passages) < 2:
        return heading + "<br>one passage: nothing to cross"
    return (heading + f"<br>prefill, {layer}: {data.within_prefill[chosen]:.0%} of a later passage token's passage "
            f"attention stays in its own passage (uniform attention: {data.uniform_prefill:.0%})")
