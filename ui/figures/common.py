"""Shared bits of the figures: escaping untrusted token text, colour scales, windowing, figure styling.

Token text comes from the model's vocabulary or an imported trace file, so it is untrusted: it goes through
:func:`escape_token` before it reaches HTML, and before it reaches plotly text (hover, tick labels,
titles), which renders a subset of HTML (``<b>``, ``<br>``, ``<a href>``) and decodes entities.
"""

from __future__ import annotations

import functools
import math
import unicodedata

import plotly.graph_objects as go

WINDOW = 200  # most tokens (or rounds, steps) a view renders at once; older ones are windowed out

# ---------------------------------------------------------------- escaping

# Characters with a meaning in HTML or in Markdown/LaTeX (Gradio renders both in some components):
# written as character references, which HTML and plotly both decode back to the same visible text.
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
_ENTITIES.update({c: f"&#{ord(c)};" for c in "\\`*_[]{}#|~$"})
_VISIBLE = {"\n": "↵", "\t": "→"}
# Control, format (zero-width, bidi overrides), separator and surrogate characters: invisible or
# layout-changing, so they are shown as escapes (a lone surrogate would also break UTF-8 encoding).
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


@functools.cache
def _escape_char(c: str) -> str:
    if c in _VISIBLE:
        return _VISIBLE[c]
    if c in _ENTITIES:
        return _ENTITIES[c]
    if unicodedata.category(c) in _INVISIBLE_CATEGORIES:
        code = ord(c)
        visible = f"x{code:02x}" if code < 0x100 else f"u{code:04x}" if code < 0x10000 else f"U{code:08x}"
        return "&#92;" + visible  # a backslash, itself escaped
    return c


@functools.lru_cache(maxsize=65536)
def escape_token(text: str) -> str:
    """HTML-safe, Markdown-inert text with whitespace and control characters made visible.

    ``"\\n"`` -> ``↵``, ``"\\t"`` -> ``→``, other invisible characters -> ``\\xNN`` / ``\\uNNNN`` text; spaces are
    kept as they are (render them with ``white-space: pre-wrap``). Safe inside element content and quoted
    attribute values.
    """
    return "".join(_escape_char(c) for c in text)


def token_label(vocab: dict[int, str], token_id: int) -> str:
    """The escaped text of a token; ids missing from the stored vocabulary show as ``<id>``."""
    return escape_token(vocab.get(token_id, f"<{token_id}>"))


# ---------------------------------------------------------------- colours

RAW_COLOR = "rgb(99, 110, 250)"  # the model's distribution
PROCESSED_COLOR = "rgb(239, 85, 59)"  # the distribution actually sampled from
CHOSEN_COLOR = "rgb(0, 160, 110)"
TEXT_COLOR = "rgb(128, 128, 128)"  # mid grey: readable on white and on near-black pages
GRID_COLOR = "rgba(128, 128, 128, 0.25)"

# Low probability (surprising) red, through amber, to high probability green; translucent so text keeps
# the theme's own colour on light and dark backgrounds alike.
_CONFIDENCE_STOPS = ((220, 50, 50), (235, 175, 35), (40, 170, 90))
TOKEN_ALPHA = 0.42
ENTROPY_SCALE_NATS = 5.0  # entropies at or above this get the full "uncertain" colour
RANK_BUCKETS: tuple[tuple[int | None, str, tuple[int, int, int]], ...] = (
    (1, "top-1", (40, 170, 90)),
    (10, "top-10", (235, 200, 35)),
    (100, "top-100", (240, 120, 40)),
    (None, "other", (170, 80, 220)),
)  # GLTR-style buckets: (highest rank in bucket or None, label, colour)


def rgba(rgb: tuple[int, int, int], alpha: float = TOKEN_ALPHA) -> str:
    """A translucent CSS/plotly colour: backgrounds that work under light and dark text alike."""
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha})"


def confidence_color(t: float, alpha: float = TOKEN_ALPHA) -> str:
    """Colour for a confidence in [0, 1]: 0 red (surprising), 0.5 amber, 1 green (expected)."""
    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 0.0
    scaled = t * (len(_CONFIDENCE_STOPS) - 1)
    i = min(int(scaled), len(_CONFIDENCE_STOPS) - 2)
    frac = scaled - i
    lo, hi = _CONFIDENCE_STOPS[i], _CONFIDENCE_STOPS[i + 1]
    return rgba(tuple(round(a + (b - a) * frac) for a, b in zip(lo, hi)), alpha)


def entropy_color(nats: float) -> str:
    """A fixed scale (not the run's own maximum), so colours stay put while a live trace grows."""
    return confidence_color(1.0 - nats / ENTROPY_SCALE_NATS)


def rank_bucket(rank: int) -> int:
    """Index into :data:`RANK_BUCKETS` for a 1-based rank."""
    return next(i for i, (top, _, _) in enumerate(RANK_BUCKETS) if top is None or rank <= top)


def rank_color(rank: int) -> str:
    return rgba(RANK_BUCKETS[rank_bucket(rank)][2])


# ---------------------------------------------------------------- windowing


def window_bounds(total: int, window: tuple[int, int] | None = None, size: int = WINDOW) -> tuple[int, int]:
    """A clamped half-open range [start, stop) of ``total`` items; by default the last ``size``."""
    if window is None:
        return max(0, total - size), total
    start = min(max(0, int(window[0])), total)
    return start, min(max(start, int(window[1])), total)


def window_note(start: int, stop: int, total: int, noun: str = "tokens") -> str:
    """``"showing tokens a–b of n"`` (1-based, inclusive), or ``""`` when everything is shown."""
    if start == 0 and stop == total:
        return ""
    if start >= stop:
        return f"showing no {noun} of {total}"
    return f"showing {noun} {start + 1}–{stop} of {total}"


# ---------------------------------------------------------------- plotly

GL_THRESHOLD = 1000  # points per trace above which WebGL scatter is used (SVG gets slow past a few thousand)


def scatter_class(points: int) -> type[go.Scatter] | type[go.Scattergl]:
    return go.Scattergl if points > GL_THRESHOLD else go.Scatter


def style_figure(fig: go.Figure, title: str = "", height: int | None = None) -> go.Figure:
    """Theme-neutral styling: transparent backgrounds and mid-grey text read on light and dark pages.

    ``title`` is rendered by plotly as HTML: escape any token text in it first. Each ``<br>`` in it adds
    a line's height to the top margin.
    """
    extra_lines = title.count("<br>")
    fig.update_layout(
        template="none",  # no embedded template: smaller JSON on every live update
        # plotly lifts a multi-line title anchored at the top by about half a line: pad it back down
        title={"text": title, "x": 0.01, "xanchor": "left", "yref": "container", "y": 1, "yanchor": "top",
               "pad": {"t": 18 if extra_lines else 10}, "font": {"size": 14}},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font={"color": TEXT_COLOR, "size": 12},
        margin={"l": 60, "r": 20, "t": (60 + 18 * extra_lines) if title else 20, "b": 40},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0.01},
        hoverlabel={"align": "left"},
        height=height,
    )
    axes = {"gridcolor": GRID_COLOR, "zerolinecolor": GRID_COLOR, "automargin": True, "title_standoff": 8}
    fig.update_xaxes(**axes)
    fig.update_yaxes(**axes)
    return fig


def tick_labels(labels: list[str], most: int = 60) -> dict:
    """Axis ticks for every label while they fit, every n-th one after that (hover still names each cell)."""
    every = max(1, -(-len(labels) // most))
    return {"tickvals": list(range(0, len(labels), every)), "ticktext": labels[::every]}


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A figure with no data and ``message`` (plotly HTML: escape untrusted parts) in its middle."""
    fig = go.Figure()
    fig.add_annotation(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style_figure(fig, title, height=260)
