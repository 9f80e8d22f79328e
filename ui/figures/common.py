"""Shared bits of the figures: escaping untrusted token text, colour scales, windowing, figure styling.

Token text comes from the model's vocabulary or an imported trace file, so it is untrusted: it goes through
:func:`escape_token` before it reaches HTML, and before it reaches plotly text (hover, tick labels,
titles), which renders a subset of HTML (``<b>``, ``<br>``, ``<a href>``) and decodes entities.
"""

from __future__ import annotations

import functools
import html
import math
import re
import unicodedata
from collections.abc import Sequence

import plotly.graph_objects as go

WINDOW = 200  # most tokens (or rounds, steps) a view renders at once; older ones are windowed out

# ---------------------------------------------------------------- escaping

# Characters with a meaning in HTML or in Markdown/LaTeX (Gradio renders both in some components):
# written as character references, which HTML and plotly both decode back to the same visible text. Plotly
# decodes numeric references and only a few names (amp, lt, gt, ...): a quote is "&#34;", never "&quot;".
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#x27;"}
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


def escape_text(text: str) -> str:
    """Untrusted text that is not a token (a prompt, a reason, a model name, an error message) for any place that
    renders HTML or Markdown: :func:`escape_token`, but line breaks and tabs are kept (render with
    ``white-space: pre-wrap``). Every string from a trace, a model or a user passes through one of the two."""
    return "".join(c if c in "\n\t" else _escape_char(c) for c in text)


def shorten(text: str, limit: int | None = None, keep: str = "start") -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut (``keep="end"`` keeps the tail
    instead of the head); not escaped: for plain-text places (a Dataframe cell, a dropdown label)."""
    if limit is None or len(text) <= limit:
        return text
    limit = max(1, limit)
    return text[: limit - 1] + "…" if keep == "start" else "…" + text[len(text) - limit + 1 :]


def clip_text(text: str, limit: int | None = None, keep: str = "start") -> str:
    """Untrusted text as a label: cut to at most ``limit`` characters (see :func:`shorten`), then escaped.
    Cutting happens before escaping, so no character reference is ever split. The one place figures shorten
    token text: show the whole text in the hover."""
    return escape_token(shorten(text, limit, keep))


def token_label(vocab: dict[int, str], token_id: int, limit: int | None = None) -> str:
    """The escaped text of a token, cut to ``limit`` characters when given (see :func:`clip_text`); ids missing
    from the stored vocabulary show as ``<id>``."""
    return clip_text(vocab.get(token_id, f"<{token_id}>"), limit)


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


# ---------------------------------------------------------------- sizes and text widths

FIGURE_WIDTH = 1300  # px: a full-width view in a 1400 x 900 window; labels and ticks are fitted to it
PRIMARY_HEIGHTS = (420, 560)  # the one large view of a run kind
SECONDARY_HEIGHTS = (320, 420)  # the views below it
FONT_SIZE = 12
TITLE_SIZE = 16
MARGIN = {"l": 70, "r": 30, "b": 56}  # the top margin follows the title's lines
TITLE_LINE_PX = 20
COLORBAR_PX = 90  # a vertical colourbar with its title takes about this much of the width
CHAR_EM = 0.62  # a generous average advance of one character, in em, of plotly's default sans-serif font
_TAG = re.compile(r"<[^>]*>")


def visible_text(label: str) -> str:
    """What plotly shows for a label: our own tags dropped, character references decoded (token text is
    escaped, so every ``<`` left in a label is one of ours)."""
    return html.unescape(_TAG.sub("", label))


def text_px(label: str, font_size: float = FONT_SIZE) -> float:
    """Estimated width in pixels of a (plotly HTML) label; East Asian wide characters count twice."""
    chars = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in visible_text(label))
    return chars * CHAR_EM * font_size


def chars_that_fit(px: float, font_size: float = FONT_SIZE) -> int:
    """How many (narrow) characters fit in ``px`` pixels."""
    return max(0, int(px / (CHAR_EM * font_size)))


def nice_step(every: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 25, 50, 100, ... at or above ``every``."""
    step, scale = 1, 1
    while step < every:
        for m in (1, 2, 5, 10, 20, 25, 50):
            step = m * scale
            if step >= every:
                return step
        scale *= 100
    return step


def fit_dtick(count: int, span_px: float, label_px: float) -> int:
    """A tick interval (1, 2, 5, 10, ...) that labels ``count`` evenly spaced items over ``span_px`` pixels
    with no two labels closer than ``label_px``."""
    fits = max(1, int(span_px // max(label_px, 1.0)))
    return nice_step(count / fits)


def plot_size(fig: go.Figure, width: int = FIGURE_WIDTH, colorbar: bool = False) -> tuple[float, float]:
    """The plotting area of a styled figure drawn ``width`` pixels wide: (width, height) in pixels."""
    margin = fig.layout.margin
    w = width - (margin.l or 0) - (margin.r or 0) - (COLORBAR_PX if colorbar else 0)
    h = (fig.layout.height or SECONDARY_HEIGHTS[1]) - (margin.t or 0) - (margin.b or 0)
    return float(w), float(h)


def height_for(role: str, wanted: float | None = None) -> int:
    """A figure height for ``role`` ("primary" or "secondary"): ``wanted`` clamped to the role's range, or the
    range's middle when not given."""
    low, high = PRIMARY_HEIGHTS if role == "primary" else SECONDARY_HEIGHTS
    return int((low + high) / 2 if wanted is None else min(max(wanted, low), high))


# ---------------------------------------------------------------- plotly

GL_THRESHOLD = 1000  # points per trace above which WebGL scatter is used (SVG gets slow past a few thousand)


def scatter_class(points: int) -> type[go.Scatter] | type[go.Scattergl]:
    return go.Scattergl if points > GL_THRESHOLD else go.Scatter


def style_figure(fig: go.Figure, title: str = "", height: int | None = None, role: str = "secondary",
                 clamp: bool = True) -> go.Figure:
    """The one place figures get their look: a visible title inside the figure (the app hides Gradio's own
    label), a height for a full-width view, margins that leave room for tick labels, and theme-neutral colours
    (transparent backgrounds, mid-grey text and grid) that read on light and dark pages alike.

    ``title`` is rendered by plotly as HTML: escape any token text in it first. Its first line is the heading;
    each ``<br>`` adds a smaller detail line and a line's height to the top margin. ``height`` is clamped to
    the ``role``'s range (:data:`PRIMARY_HEIGHTS` or :data:`SECONDARY_HEIGHTS`; its middle when not given)
    unless ``clamp`` is False (figures that grow with their content to keep labels apart).
    """
    heading, _, details = title.partition("<br>")
    extra_lines = title.count("<br>")
    small = f"<span style='font-size:{FONT_SIZE}px'>"
    text = heading + "".join(f"<br>{small}{line}</span>" for line in details.split("<br>")) if details else heading
    if clamp or height is None:
        height = height_for(role, height)
    fig.update_layout(
        template="none",  # no embedded template: smaller JSON on every live update
        # plotly lifts a multi-line title anchored at the top by about half a line: pad it back down
        title={"text": text, "x": 0.01, "xanchor": "left", "yref": "container", "y": 1, "yanchor": "top",
               "pad": {"t": 16 if extra_lines else 10}, "font": {"size": TITLE_SIZE, "color": TEXT_COLOR}},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font={"color": TEXT_COLOR, "size": FONT_SIZE},
        margin={**MARGIN, "t": (56 + TITLE_LINE_PX * extra_lines) if title else 24},
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom", "x": 0.01,
                "bgcolor": "rgba(0,0,0,0)"},
        hoverlabel={"align": "left"},
        height=height,
    )
    axes = {"gridcolor": GRID_COLOR, "zerolinecolor": GRID_COLOR, "linecolor": GRID_COLOR, "automargin": True,
            "title_standoff": 8}
    fig.update_xaxes(**axes)
    fig.update_yaxes(**axes)
    return fig


def tick_labels(labels: list[str], most: int = 60, span_px: float | None = None,
                font_size: float = FONT_SIZE) -> dict:
    """Axis ticks for every label while they fit, every n-th one after that (hover still names each cell):
    at most ``most``, and with ``span_px`` (the axis length in pixels) no more than one per text line."""
    if span_px is not None:
        most = max(1, min(most, int(span_px // (font_size * 1.35))))
    every = max(1, -(-len(labels) // most))
    return {"tickvals": list(range(0, len(labels), every)), "ticktext": labels[::every]}


# ---------------------------------------------------------------- contrast


def _channel(c: float) -> float:
    c /= 255
    return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4


def luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour (0-255 channels)."""
    r, g, b = (_channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG contrast ratio of two opaque colours, 1 to 21."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colour_on(rgb: Sequence[float]) -> str:
    """Black or white, whichever contrasts more with an opaque cell colour."""
    return "black" if contrast_ratio(rgb, (0, 0, 0)) >= contrast_ratio(rgb, (255, 255, 255)) else "white"


def cell_text_trace(x: list, y: list, labels: list[str], fills: list[Sequence[float] | None],
                    font_size: float = FONT_SIZE, name: str = "cell text") -> go.Scatter:
    """Text drawn over heatmap cells: each label black or white, whichever contrasts more with its opaque cell
    fill (mid grey where the cell has none). Labels must already be escaped and cut to fit their cells."""
    colours = [TEXT_COLOR if fill is None else text_colour_on(fill) for fill in fills]
    return go.Scatter(x=x, y=y, text=labels, mode="text", name=name, hoverinfo="skip", showlegend=False,
                      textfont={"size": font_size, "color": colours}, cliponaxis=True)


def scale_colour(scale: str, t: float) -> tuple[int, int, int]:
    """The colour at ``t`` in [0, 1] of a named plotly sequential colour scale (e.g. ``"Viridis"``)."""
    from plotly.colors import get_colorscale, sample_colorscale, unlabel_rgb

    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 0.0
    colour = sample_colorscale(get_colorscale(scale), [t], colortype="rgb")[0]
    return tuple(round(c) for c in unlabel_rgb(colour))


def empty_figure(message: str, title: str = "") -> go.Figure:
    """A figure with no data and ``message`` (plotly HTML: escape untrusted parts) in its middle."""
    fig = go.Figure()
    fig.add_annotation(
        text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font={"size": 14}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return style_figure(fig, title, height=SECONDARY_HEIGHTS[0])
