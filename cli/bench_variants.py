"""``bench variants``: LLM-KICK's point, measured: does perplexity hide what compression does to knowledge?

For the base model and each variant, in one run: perplexity on ``assets/benchmarks/perplexity_text.txt`` and
closed-book exact match on ``assets/benchmarks/knowledge_qa.jsonl`` (``engine.offline.knowledge_eval``), with the
change from the base: Δppl %, ΔEM in points, and ``kick`` = relative EM loss / relative perplexity increase (above 1:
knowledge falls faster than perplexity says). A variant is built in memory with ``apply_variant`` from a short name
(``int8``, ``int4-g32``, ``wanda-50``, ``magnitude-2:4``) or loaded by ``load_model`` (a saved variant's name or
folder). ``open_book`` adds the exact match with the fact's sentence in the prompt (in-context retrieval).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.models.handle import LoadedModel
from engine.models.variant_spec import VariantSpec
from engine.params import ParamError

if TYPE_CHECKING:
    from engine.offline.knowledge_eval import Question

# int4 groups must divide every linear's input width: SmolLM2's 576 takes 32 and 64, not 128.
DEFAULT_VARIANTS = ("int8", "int4-g32", "int4-g64", "magnitude-25", "wanda-25", "magnitude-50", "wanda-50",
                    "magnitude-2:4", "wanda-2:4")
_SHORT = re.compile(r"(?P<int>int8|int4(?:-g(?P<group>\d+))?)|(?P<prune>magnitude|wanda)-(?:(?P<pattern>\d+(?::|of)\d+)"
                    r"|(?P<percent>\d+(?:\.\d+)?))")


@dataclass(frozen=True)
class Row:
    name: str
    ppl: float
    em: float
    open_em: float | None = None


def variant_spec(text: str) -> VariantSpec | None:
    """The spec a short name stands for, or None when ``text`` is not one (then it names a model to load)."""
    match = _SHORT.fullmatch(text)
    if match is None:
        return None
    if match["int"]:
        return VariantSpec(quantize=match["int"][:4], group_size=int(match["group"]) if match["group"] else None)
    if match["pattern"]:
        return VariantSpec(prune=match["prune"], pattern=match["pattern"].replace("of", ":"))
    return VariantSpec(prune=match["prune"], sparsity=float(match["percent"]) / 100)


def relative_change(value: float, base: float) -> float:
    return (value - base) / base if base else math.nan


def kick(row: Row, base: Row) -> float:
    """Relative EM loss over relative perplexity increase; nan where perplexity did not rise."""
    rise = relative_change(row.ppl, base.ppl)
    return (base.em - row.em) / base.em / rise if rise > 0 and base.em > 0 else math.nan


def measure(model: LoadedModel, text: str, questions: Sequence[Question], open_book: bool,
            progress: Callable[[str], object]) -> Row:
    from engine.offline.knowledge_eval import exact_match, perplexity

    progress(f"{model.name}: perplexity")
    ppl = perplexity(model, text).ppl
    progress(f"{model.name}: closed-book")
    em = exact_match(model, questions).accuracy
    open_em = None
    if open_book:
        progress(f"{model.name}: open-book")
        open_em = exact_match(model, questions, open_book=True).accuracy
    return Row(model.name, ppl, em, open_em)


def print_row(row: Row, base: Row, width: int) -> None:
    open_part = "" if row.open_em is None else f" {row.open_em * 100:8.1f} {(row.open_em - base.open_em) * 100:+7.1f}"
    ratio = kick(row, base)
    print(f"{row.name:{width}} {row.ppl:8.2f} {relative_change(row.ppl, base.ppl) * 100:+8.1f} {row.em * 100:6.1f} "
          f"{(row.em - base.em) * 100:+6.1f} {'-' if math.isnan(ratio) else f'{ratio:.2f}':>6}{open_part}", flush=True)


def main(model: LoadedModel, variants: Sequence[str] = DEFAULT_VARIANTS, *, open_book: bool = False,
         questions: Sequence[Question] | None = None, text: str | None = None) -> list[Row]:
    """Measure the base and each variant, printing each row as it is measured; returns the rows (base first).
    ``questions`` and ``text`` default to the benchmark files."""
    from tqdm import tqdm

    from engine.models import load_model
    from engine.models.variants import apply_variant
    from engine.offline.knowledge_eval import TEXT_PATH, read_questions

    specs = {name: variant_spec(name) for name in variants}  # a malformed short name fails before any work
    text = TEXT_PATH.read_text(encoding="utf-8") if text is None else text
    questions = read_questions() if questions is None else questions
    width = max(len(model.name) + 16, *(len(name) for name in variants))
    bar = tqdm(total=1 + len(variants), unit="model", file=sys.stderr)
    print(f"{model.name}: perplexity on {len(text):,} characters of prose; exact match on {len(questions)} one-word questions "
          f"({'closed and open book' if open_book else 'closed book'}), greedy")
    print(f"{'model':{width}} {'ppl':>8} {'Δppl %':>8} {'EM %':>6} {'ΔEM':>6} {'kick':>6}"
          + (f" {'open EM %':>8} {'Δopen':>7}" if open_book else ""), flush=True)
    base = measure(model, text, questions, open_book, bar.set_description)
    print_row(base, base, width)
    bar.update()
    rows = [base]
    for name in variants:
        bar.set_description(f"building {name}")
        spec = specs[name]
        variant = apply_variant(model, spec) if spec is not None else load_model(name, dtype=model.dtype_name)
        rows.append(measure(variant, text, questions, open_book, bar.set_description))
        del variant  # one variant's weights in memory at a time
        print_row(rows[-1], base, width)
        bar.update()
    bar.close()
    return rows


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ParamError("--variants needs at least one name, such as int8,wanda-50")
    return names
