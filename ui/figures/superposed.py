"""Superposed decoding: the drafts as a lattice over steps, and one step's draft x token candidate grid.

A SuperposedStep lists the drafts entering the step (``parts[0]`` = the mixing weight of each), the candidates
draft-major (the same kept tokens for every draft; ``parts`` = [LM log p, n-gram log p]), the candidates kept as
the next drafts (``kept``, in their new slot order) and those that ended with EOS (``finished``).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from engine.events import SuperposedStep
from engine.trace import Trace
from ui.figures.common import CHOSEN_COLOR, GRID_COLOR, WINDOW, empty_figure, escape_token, style_figure, token_label, window_note

NO_STEPS = "This run has no superposed steps: record it with the <b>superposed</b> decoder."
TAIL_TOKENS = 12  # draft text shown in a hover
LABEL_CHARS = 10  # a node's token label is cut to this many characters; the hover has it whole


def superposed_steps(trace: Trace) -> list[SuperposedStep]:
    return [e for e in trace.events if isinstance(e, SuperposedStep)]


def parent_draft(step: SuperposedStep, candidate: int) -> int:
    """The draft a candidate extends (candidates are draft-major, the same number per draft)."""
    return candidate // max(1, len(step.candidates) // max(1, len(step.drafts)))


def weights_of(step: SuperposedStep) -> list[float]:
    """Softmax of the kept candidates' scores: the mixing weights the new drafts enter the next step with."""
    scores = [step.candidates[i].score for i in step.kept]
    if not scores:
        return []
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    return [e / sum(exps) for e in exps]


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else ("−∞" if x < 0 else "∞")


def drafts_figure(trace: Trace) -> go.Figure:
    """The drafts over steps: x = step, y = draft slot (finished drafts below the live ones); each node is the token
    a draft took, coloured by its mixing weight, joined to the draft it extends; the answer's path is outlined."""
    steps = superposed_steps(trace)
    if not steps:
        return empty_figure(NO_STEPS)
    first, stop = max(0, len(steps) - WINDOW), len(steps)
    answer = trace.output_token_ids
    paths: list[list[int]] = [[]]  # token paths of the drafts entering the current step
    xs, ys, texts, hovers, colours, outlines = [], [], [], [], [], []
    edge_x: list[float | None] = []
    edge_y: list[float | None] = []
    width = 1
    for t, step in enumerate(steps):
        nodes = [(slot, i, "live") for slot, i in enumerate(step.kept)]
        nodes += [(len(step.kept) + j, i, "finished with EOS") for j, i in enumerate(step.finished)]
        weights = weights_of(step)
        new_paths = []
        for slot, i, state in nodes:
            c, parent = step.candidates[i], parent_draft(step, i)
            path = (paths[parent] if parent < len(paths) else []) + [c.token_id]
            if state == "live":
                new_paths.append(path)
            if t < first:
                continue
            width = max(width, slot + 1)
            xs.append(step.step)
            ys.append(slot)
            texts.append(token_label(trace.vocab, c.token_id, LABEL_CHARS))
            weight = weights[slot] if state == "live" else None
            colours.append(weight if weight is not None else 0.0)
            outlines.append(CHOSEN_COLOR if path == answer[: len(path)] else GRID_COLOR)
            tail = escape_token(trace.text_of(path[-TAIL_TOKENS:]))
            hovers.append(
                f"step {step.step} · slot {slot} ({state}) · from draft {parent}<br>token “{token_label(trace.vocab, c.token_id)}”"
                f"<br>score {_fmt(c.score)}" + (f" · weight {weight:.3g}" if weight is not None else "")
                + f"<br>LM log p {_fmt(c.parts[0])} · n-gram log p {_fmt(c.parts[1])}<br>…{tail}"
            )
            if t > first:
                edge_x += [step.step - 1, step.step, None]
                edge_y += [parent, slot, None]
        paths = new_paths
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=edge_x, y=edge_y, mode="lines", line={"color": GRID_COLOR, "width": 1}, hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers+text", text=texts, textposition="top center", hovertext=hovers, hoverinfo="text",
        marker={"size": 14, "color": colours, "colorscale": "Viridis", "cmin": 0, "cmax": 1,
                "line": {"color": outlines, "width": 2}, "colorbar": {"title": {"text": "weight"}}},
        showlegend=False,
    ))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="draft slot", autorange="reversed", tickvals=list(range(width)))
    note = window_note(first, stop, len(steps), noun="steps")
    title = (f"Superposed drafts over steps · {len(steps[-1].kept)} live<br>colour: mixing weight · outlined:"
             " the answer's path" + (f" · {note}" if note else ""))
    return style_figure(fig, title, height=160 + 60 * width, role="primary")


def candidates_figure(trace: Trace, step: int) -> go.Figure:
    """One step's candidates: rows = drafts (with their mixing weights), columns = the kept tokens; colour = the
    cumulative score; hover splits it into the LM and n-gram log-probs; ✓ marks new drafts, ■ finished ones."""
    event = next((s for s in superposed_steps(trace) if s.step == step), None)
    if event is None:
        return empty_figure(f"No superposed step {step} in this run." if superposed_steps(trace) else NO_STEPS)
    per_draft = max(1, len(event.candidates) // max(1, len(event.drafts)))
    columns = [c.token_id for c in event.candidates[:per_draft]]
    marks = {i: f"✓{slot}" for slot, i in enumerate(event.kept)} | {i: "■" for i in event.finished}
    z, text, hover = [], [], []
    for d, draft in enumerate(event.drafts):
        block = event.candidates[d * per_draft : (d + 1) * per_draft]
        z.append([c.score if math.isfinite(c.score) else None for c in block])
        text.append([marks.get(d * per_draft + j, "") for j in range(len(block))])
        hover.append([
            f"draft {d} + “{token_label(trace.vocab, c.token_id)}”<br>score {_fmt(c.score)}"
            f"<br>LM log p {_fmt(c.parts[0])}<br>n-gram log p {_fmt(c.parts[1])}"
            for c in block
        ])
    rows = [f"draft {d} · w {draft.parts[0]:.3g}" for d, draft in enumerate(event.drafts)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(len(columns))), y=rows, text=text, texttemplate="%{text}", customdata=hover,
        hovertemplate="%{customdata}<extra></extra>", colorscale="Viridis", colorbar={"title": {"text": "score"}},
    ))
    fig.update_xaxes(title_text="kept token", tickvals=list(range(len(columns))),
                     ticktext=[token_label(trace.vocab, t, LABEL_CHARS) for t in columns])
    fig.update_yaxes(autorange="reversed")
    title = (f"Superposed step {event.step}: {len(event.drafts)} draft(s) × {len(columns)} tokens, coloured by score"
             "<br>✓n: kept as draft n · ■: finished")
    return style_figure(fig, title, height=160 + 40 * len(rows))
