"""Float32 linear layers on the CPU, each call computed by the faster of two equivalent matrix products for its
number of rows (tokens).

``F.linear(x, W)`` asks MKL for x @ W^T. For a few rows some CPUs run that at half the memory bandwidth that the
same product written as (W @ x^T)^T reaches (an AMD EPYC with MKL 2024.2 and two threads: a forward's worth of
SmolLM2-135M's weights took 37 ms for one row one way, 18 ms the other; four rows took 57 ms against 21 ms). A
decoding step reads every weight once, so its time is that of these products, and a speculative verify of a few
tokens costs what one token costs only when the fast form serves both. Which form wins depends on the CPU, the
thread count and the rows, so ``row_kernels`` times both on the model's own layers once per machine and caches the
choice; ``use_row_kernels`` then routes each layer's calls. Both forms are exact float32 products; they only
round in a different order.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
import torch
import torch.nn.functional as F

from engine.files import write_atomically
from engine.models.cache import data_dir

ROW_COUNTS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32)
# a form must beat F.linear by this much to be chosen: timing noise must not flip the choice
MARGIN = 0.95
REPEATS = 3
# Below this many bytes of weights (tiny test models, drafter heads) the weights sit in cache, both forms take
# microseconds and a timing would pick by noise: such models keep F.linear, and behave the same on every machine.
MIN_WEIGHT_BYTES = 64 * 2**20


def linear_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, columns: int = 0) -> torch.Tensor:
    """x @ W^T (+ bias): as ``F.linear`` when ``columns`` is 0, else as (W @ x^T)^T with x's rows padded to
    ``columns`` (MKL has fast paths for some column counts only, and one column takes the slow matrix-vector
    path)."""
    if not columns:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if columns > count:  # one row (greedy's steps) doubled: the fastest padding to two
        rows = torch.cat((rows, rows)) if count == 1 and columns == 2 else F.pad(rows, (0, 0, 0, columns - count))
    out = torch.mm(weight, rows.t())
    # contiguous: the elementwise operations after a layer run several times slower on a transposed view
    out = (out[:, :count] if columns > count else out).t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class RowKernelLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward takes the product its row count was timed fastest with."""

    row_kernels: dict[int, int]  # every row count up to the largest timed one -> its columns (see by_row_count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_product(x, self.weight, self.bias, self.row_kernels.get(x.numel() // x.shape[-1], 0))


def columns_for(table: dict[int, int], rows: int) -> int:
    """The table's choice for the smallest timed row count at least ``rows`` (0: F.linear; F.linear above the
    largest)."""
    for count in ROW_COUNTS:
        if rows <= count:
            return table.get(count, 0)
    return 0


def by_row_count(table: dict[int, int]) -> dict[int, int]:
    """``table`` spelled out for every row count up to the largest timed one: one dictionary lookup per call."""
    return {rows: columns_for(table, rows) for rows in range(1, ROW_COUNTS[-1] + 1)}


def _layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [
        module for module in model.modules()  # plain nn.Linear only: a subclass computes its own way
        if type(module) in (torch.nn.Linear, RowKernelLinear) and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    ]


def _time_pass(layers: list[torch.nn.Linear], rows: int, columns: int) -> float:
    """Seconds for one call of every layer in turn: a forward's worth of weights, so none stays in cache."""
    numbers = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    inputs = {width: torch.randn(rows, width, generator=numbers) for width in {layer.in_features for layer in layers}}
    start = time.perf_counter()
    for layer in layers:
        linear_product(inputs[layer.in_features], layer.weight, layer.bias, columns)
    return time.perf_counter() - start


def measure_row_kernels(layers: list[torch.nn.Linear]) -> dict[int, tuple[float, float]]:
    """Per row count, the fastest of ``REPEATS`` passes as F.linear and as W @ x^T of that many columns (two for
    one row); interleaved, so drift hits both alike."""
    best = {rows: (float("inf"), float("inf")) for rows in ROW_COUNTS}
    with torch.inference_mode():
        for columns in (0, 2):  # warm-up: first calls allocate and load the library's code paths
            _time_pass(layers, 2, columns)
        for _ in range(REPEATS):
            for rows in ROW_COUNTS:
                plain, weight_first = _time_pass(layers, rows, 0), _time_pass(layers, rows, max(rows, 2))
                best[rows] = (min(best[rows][0], plain), min(best[rows][1], weight_first))
    return best


def choose(timings: dict[int, tuple[float, float]]) -> dict[int, int]:
    """Per row count, 0 (F.linear) or the column count to pad to: W @ x^T of a timed count from the rows up to
    twice as many (two for one row), the fewest columns whose time is within ``MARGIN`` of the fastest of them,
    where that beats F.linear by ``MARGIN``."""
    table = {}
    for rows, (plain, _) in timings.items():
        counts = [count for count in timings if rows <= count <= max(2 * rows, 2)]
        fastest = min(timings[count][1] for count in counts)
        padded = next(count for count in counts if MARGIN * timings[count][1] <= fastest)
        table[rows] = max(padded, 2) if timings[padded][1] < MARGIN * plain else 0
    return table


def _machine_key(layers: list[torch.nn.Linear]) -> str:
    shapes = sorted({tuple(layer.weight.shape) for layer in layers})
    return json.dumps([_cpu_name(), torch.__version__, torch.get_num_threads(), len(layers), shapes])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row_kernels(
    model: torch.nn.Module, cache: Path | None = None, progress: Callable[[str], None] | None = None
) -> dict[int, int]:
    """The model's choice of product per row count on this machine: read from ``cache`` (a JSON file under the
    data home by default) or timed now (3 s for a 135M model) and stored there."""
    layers = _layers(model)
    if sum(layer.weight.nbytes for layer in layers) < MIN_WEIGHT_BYTES:
        return {}
    path = cache or data_dir() / "row-kernels.json"
    key = _machine_key(layers)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        if progress:
            progress("timing this model's linear layers on this machine (once; a few seconds)")
        known[key] = {str(rows): columns for rows, columns in choose(measure_row_kernels(layers)).items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda partial: partial.write_text(json.dumps(known, indent=1)))
    return {int(rows): int(columns) for rows, columns in known[key].items()}


def use_row_kernels(model: torch.nn.Module, table: dict[int, int]) -> None:
    """Route every float32 CPU linear layer of ``model`` through ``table``. An empty table means F.linear
    throughout: routed layers go back to it, and the others stay plain (no lookup added to their calls)."""
    spelled_out = by_row_count(table)
    for layer in _layers(model):
        if table or isinstance(layer, RowKernelLinear):
            layer.__class__ = RowKernelLinear
            layer.row_kernels = spelled_out


def tune_linear_layers(model: torch.nn.Module, progress: Callable[[str], None] | None = None) -> dict[int, int]:
    """Time (or recall) and install the row-count choice of ``model``'s float32 CPU linear layers; the table."""
    table = row_kernels(model, progress=progress)
    use_row_kernels(model, table)
    return table


@contextmanager
def plain_linear(model: torch.nn.Module) -> Iterator[None]:
    """Every routed layer of ``model`` on F.linear inside the block (a benchmark's baseline)."""
    tables = {layer: layer.row_kernels for layer in model.modules() if isinstance(layer, RowKernelLinear)}
    try:
        for layer in tables:
            layer.row_kernels = {}
        yield
    finally:
        for layer, table in tables.items():
            layer.row_kernels = table
