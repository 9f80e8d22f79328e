"""Cost-aware draft length for the shared round loop: each round, the draft depth that pays most on this machine.

A round that drafts to depth d and verifies its n(d) nodes commits 1 + E[accepted(d)] tokens in t_draft(d) +
t_verify(1 + n(d)) seconds; a round without a draft (d = 0) is a plain one-token target step. On a CPU a forward of
11 tokens costs about 1.5x a forward of one, so long drafts rejected at depth 1 make decoding slower than greedy
(BENCHMARKS.md). The controller measures both sides online and caps each round's draft at the depth that maximises
expected tokens per second:

* cost: t_verify(n), everything a round costs besides drafting (recording included): the mean time of the rounds of
  that size where seen (:class:`VerifyCost`: a CPU's matrix kernels step, e.g. 3 tokens cost 1.1x one and 4 cost
  1.6x, which no line follows), else a + b n, least squares over the rounds seen, its slope shrunk towards
  ``PRIOR_SLOPE`` x the one-token cost while few sizes were seen; a round over ``OUTLIER_RATIO`` x the fit is
  clipped to it (a busy machine's stall once made plain steps look dear);
  t_draft(d) ~ (measured draft seconds per drafted level) x d;
* gain: per depth k, how often a draft reaches k (chains shorter than the cap, trees' level sizes) and the
  acceptance at k given the verifier tried it (:func:`engine.recorder.depth_outcomes`), a Beta prior keeping
  untried depths at ``PRIOR_ACCEPTANCE``; recent rounds weigh more (``MEMORY``);
* start: the first round (which runs the prompt) drafts one level, then come plain one-token steps until their cost
  is known (two rounds): what greedy pays anyway, and what every draft is weighed against. One level is every
  drafter's cheapest informative draft (DySpec's full first tree took 16 draft forwards, a fifth of a 32-token run
  on a draft that is never accepted); once it pays, the next draft is the drafter's own length, so deep drafters
  reach their depth a round later;
* width: a drafter whose nodes can be verified in part (the trained heads' trees, Token Recycling's, and draft
  models' chains and trees when verification is greedy) has its draft cut to the nodes that pay: the most likely
  ones by path probability (the product of draft probabilities from the root), each worth the acceptance rate
  nodes of that path probability have had (:class:`PathCalibration`), up to the count with most expected tokens
  per verify second. A tree cut to 2 of 6 levels otherwise still verifies a third of a 24-node tree, where one or
  two confident nodes are what pays on a CPU;
* probing: while no draft pays, a one-level draft is tried again once the plain rounds since the last try have
  taken 1 / ``PROBE_BUDGET`` times what it is expected to lose (:class:`ProbeBudget`), so the run notices when
  drafting starts to pay again and losing tries cost at most that share of it. A round allowed to draft that drafted
  nothing (PPD's prompt tokens riding along to guess the next round's draft) is part of the next try, not a plain step.

Decoders whose speculation is all or nothing (lookahead's Jacobi window rides along every forward, a PEARL round
runs the draft and the target) use
:class:`PayoffSwitch` instead: speculate or take a plain step, whichever committed more tokens per second lately,
probing the losing speculation on a time budget.

The cap only ever shortens drafts (the drafter's own schedule, SpecDec++'s stop rule, a tree template, still
decide within it), and when the deepest depth seen pays best the drafter drafts uncapped, so its own growing
schedules keep working. What is drafted never changes what is committed: lossless decoders stay lossless.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine.events import DraftRound
from engine.recorder import depth_outcomes
from engine.speculative.tree import path_probs

PRIOR_SLOPE = 0.05  # extra cost of one more verified token, as a share of a one-token forward (2 CPU cores)
SLOPE_PRIOR_WEIGHT = 50.0  # in tokens squared: about two rounds five tokens away from the mean size
PRIOR_ACCEPTANCE = 0.5  # an untried depth: as likely accepted as not
ACCEPTANCE_PRIOR_WEIGHT = 1.0  # rounds' worth of evidence the prior counts for
MEMORY = 0.9  # each new observation of a depth keeps this share of the old evidence
FIRST_DEPTH = 1  # the draft depth before any draft was seen
PROBE_BUDGET = 0.04  # the largest share of the plain rounds' time that losing probes may take
OUTLIER_RATIO = 3.0  # a round slower than this x the fitted cost of its size counts as that
OUTLIER_AFTER = 3  # rounds seen before clipping starts
SIZE_EVIDENCE = 1.5  # decayed rounds of one size before their mean time replaces the fit's (two rounds)
PATH_BINS = (0.05, 0.15, 0.3, 0.5, 0.7, 0.9)  # inner edges of PathCalibration's path-probability bins
CALIBRATION_PRIOR_WEIGHT = 2.0  # nodes' worth of evidence a bin's midpoint counts for


@dataclass
class _Decayed:
    """A decayed sum of values over a decayed count of observations."""

    total: float = 0.0
    count: float = 0.0

    def add(self, value: float) -> None:
        self.total = self.total * MEMORY + value
        self.count = self.count * MEMORY + 1.0

    def mean(self, prior: float = 0.0, weight: float = 0.0) -> float:
        return (self.total + prior * weight) / (self.count + weight)


class ProbeBudget:
    """While speculating does not pay, when to try it again: once the plain rounds since the last try have taken
    ``1 / PROBE_BUDGET`` times what a try is expected to lose (its time minus the time plain steps take to commit
    as many tokens). Losing probes then cost at most ``PROBE_BUDGET`` of the run, whatever a probe costs: a
    lookahead window of 28 tokens (2.4x a step on this CPU) is tried about every 50 rounds, a one-token lookup
    draft (1.07x a step) every other round, where a count of rounds had tried both alike.

    Tries are priced when a probe is weighed, at the plain step's cost known then: a try made before any plain
    step was timed (PPD's first draft, in the round after the prompt's) had been priced at a guess, a third of its
    real loss, and the next probe came three times too early."""

    def __init__(self) -> None:
        self.waited = 0.0  # seconds of plain rounds since the last try
        self.seconds = _Decayed()  # each try's seconds
        self.committed = _Decayed()  # and the tokens it committed

    def plain(self, seconds: float) -> None:
        self.waited += seconds

    def tried(self, seconds: float, committed: int) -> None:
        """A speculative round ran for ``seconds`` and committed ``committed`` tokens."""
        self.waited = 0.0
        self.seconds.add(seconds)
        self.committed.add(committed)

    def due(self, token_seconds: float, prior_loss: float | None = None) -> bool:
        """Whether a try is due: each try loses its time minus ``token_seconds`` (what a plain step takes to commit a
        token) per token it committed; ``prior_loss`` is what one is expected to lose before any try was measured
        (a model's guess: averaged with the first measured try, it had halved PPD's real loss; without one, no try
        is due until one was measured)."""
        if not self.seconds.count:
            return prior_loss is not None and self.waited * PROBE_BUDGET >= prior_loss
        loss = self.seconds.mean() - token_seconds * self.committed.mean()
        return self.waited * PROBE_BUDGET >= loss


class PayoffSwitch:
    """For decoders whose speculation is all or nothing (a lookahead window, not a draft depth): whether this
    round should speculate or take a plain one-token step, from the committed tokens per second each kind of round
    reached lately. It speculates first (the method's own behaviour), times one plain step after ``WARM_ROUNDS``,
    then runs the faster kind and probes the other on the :class:`ProbeBudget`."""

    WARM_ROUNDS = 2  # the prompt's round and one timed speculative round (each one costs a few plain steps)

    def __init__(self) -> None:
        self.tokens = {True: _Decayed(), False: _Decayed()}  # committed, decayed, per kind of round
        self.seconds = {True: _Decayed(), False: _Decayed()}
        self.rounds = 0
        self.probes = ProbeBudget()

    def rate(self, speculated: bool) -> float:
        return self.tokens[speculated].total / max(self.seconds[speculated].total, 1e-9)

    def speculate(self) -> bool:
        if self.rounds <= self.WARM_ROUNDS or not self.seconds[False].count:
            return self.rounds != self.WARM_ROUNDS  # the warm-up, then one timed plain step
        # The warm-up's speculative round was a try: the budget prices probes from measured tries only.
        return self.rate(True) >= self.rate(False) or self.probes.due(1.0 / max(self.rate(False), 1e-9))

    def observe(self, speculated: bool, tokens: int, seconds: float) -> None:
        """A finished round; the first one (it runs the prompt too) is not a step-sized forward."""
        if self.rounds:
            self.tokens[speculated].add(tokens)
            self.seconds[speculated].add(seconds)
            if speculated:
                self.probes.tried(seconds, tokens)
            else:
                self.probes.plain(seconds)
        self.rounds += 1


class PathCalibration:
    """How often a draft node is accepted given its path probability: a decayed mean per probability bin, the
    bin's midpoint as prior (a head may be over- or under-confident; the verifier's outcomes say which)."""

    def __init__(self) -> None:
        edges = (0.0, *PATH_BINS, 1.0)
        self.priors = [(low + high) / 2 for low, high in zip(edges, edges[1:])]
        self.bins = [_Decayed() for _ in self.priors]

    def expected(self, path_prob: float) -> float:
        """The chance a node of this path probability is accepted."""
        b = self._bin(path_prob)
        return self.bins[b].mean(self.priors[b], CALIBRATION_PRIOR_WEIGHT)

    def add(self, path_prob: float, accepted: bool) -> None:
        self.bins[self._bin(path_prob)].add(float(accepted))

    @staticmethod
    def _bin(path_prob: float) -> int:
        return bisect.bisect_right(PATH_BINS, path_prob)


class LinearCost:
    """t(n) ~ a + b n from (n, seconds) observations, the slope shrunk towards ``PRIOR_SLOPE`` x t(1)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum_n = self.sum_t = self.sum_nn = self.sum_nt = 0.0

    def add(self, n: int, seconds: float) -> float:
        """Count a round of ``n`` tokens; the seconds counted (a stalled round's clipped)."""
        if self.count >= OUTLIER_AFTER:  # a round the machine stalled in (another process, a page fault) is clipped
            seconds = min(seconds, OUTLIER_RATIO * self(n))
        self.count += 1
        self.sum_n += n
        self.sum_t += seconds
        self.sum_nn += n * n
        self.sum_nt += n * seconds
        return seconds

    def coefficients(self) -> tuple[float, float]:
        """(a, b); (0, 0) before any observation."""
        if not self.count:
            return 0.0, 0.0
        mean_n, mean_t = self.sum_n / self.count, self.sum_t / self.count
        spread = self.sum_nn - self.count * mean_n * mean_n
        covariance = self.sum_nt - self.count * mean_n * mean_t
        prior_slope = PRIOR_SLOPE * mean_t / (1 + PRIOR_SLOPE * mean_n)
        slope = max(0.0, (covariance + SLOPE_PRIOR_WEIGHT * prior_slope) / (spread + SLOPE_PRIOR_WEIGHT))
        return max(0.0, mean_t - slope * mean_n), slope

    def __call__(self, n: float) -> float:
        a, b = self.coefficients()
        return a + b * n


class VerifyCost:
    """t(n): the decayed mean time of rounds of size n once ``SIZE_EVIDENCE`` of them were seen, else the
    :class:`LinearCost` fit's step from the nearest seen size; between sizes (a mean node count) interpolated."""

    def __init__(self) -> None:
        self.fit = LinearCost()
        self.by_size: dict[int, _Decayed] = {}

    @property
    def count(self) -> int:
        return self.fit.count

    def add(self, n: int, seconds: float) -> None:
        self.by_size.setdefault(n, _Decayed()).add(self.fit.add(n, seconds))

    def seen(self, n: int) -> bool:
        """Whether rounds of size n were seen often enough for their mean time to count."""
        return n in self.by_size and self.by_size[n].count >= SIZE_EVIDENCE

    def __call__(self, n: float) -> float:
        low = math.floor(n)
        return self._at(low) + (n - low) * (self._at(low + 1) - self._at(low)) if n > low else self._at(low)

    def _at(self, n: int) -> float:
        """The mean of size n's rounds; for an unseen size the fit, moved by the nearest seen size's residual (the
        fit's slope is shrunk while few sizes were seen: unmoved, it would misjudge its neighbours against it)."""
        seen = [size for size in self.by_size if self.seen(size)]
        if not seen:
            return self.fit(n)
        nearest = min(seen, key=lambda size: (abs(size - n), size))
        return self.by_size[nearest].mean() + self.fit(n) - self.fit(nearest)


class DraftLengthController:
    """Picks each round's draft depth limit (:meth:`limit`) and learns from each recorded round (:meth:`observe`)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # the one the round loop times its rounds with
        self.verify_cost = VerifyCost()
        self.draft_seconds = 0.0
        self.drafted_levels = 0
        # Per depth - 1, from the rounds whose limit allowed that depth and whose draft was not empty:
        self.accepted: list[_Decayed] = []  # accepted when the verifier tried it
        self.present: list[_Decayed] = []  # the draft had a node there
        self.sizes: list[_Decayed] = []  # how many nodes it had there
        self.deepest = 0  # the deepest level any draft has had: deeper limits change nothing
        self.rounds = 0
        self.calibration = PathCalibration()
        self.probes = ProbeBudget()
        self.empty_probe = False  # the last probe found nothing to draft (a drafter that needs a round to prepare)
        # The last round's start, nodes, draft seconds, commits and whether its limit allowed a draft:
        self._pending: tuple[float, int, float, int, bool] | None = None
        # An empty round that was allowed to draft is the next try's preparation (PPD's prompt tokens ride along one
        # round to guess the next one's drafts): its seconds and commits, counted with that try, not as a plain step.
        self._preparing = (0.0, 0)

    def limit(self, budget: int) -> int | None:
        """The deepest draft this round may have; None: the drafter's own length (uncapped).

        Called at the start of a round: it also closes the previous round's timing (a round lasts until the next
        one starts, so the recording of its event counts too).
        """
        if self._pending is not None:
            start, nodes, draft_seconds, committed, allowed = self._pending
            seconds = self.clock() - start
            if nodes or not allowed:
                self.verify_cost.add(1 + nodes, seconds - draft_seconds)
            if nodes:
                self.probes.tried(seconds + self._preparing[0], committed + self._preparing[1])
                self._preparing = (0.0, 0)
            elif allowed:
                self._preparing = (self._preparing[0] + seconds, self._preparing[1] + committed)
            else:
                self.probes.plain(seconds)
            self._pending = None
        if not self.deepest:
            return min(FIRST_DEPTH, budget)  # nothing drafted yet: the cheapest draft that says something
        if not self.verify_cost.seen(1):
            return 0  # the first timed rounds are plain steps: the cost every draft is weighed against
        best = self.best_depth(min(budget, self.deepest))
        if best > 0:
            return None if best >= self.deepest else best
        if self.empty_probe and budget:  # PPD's prompt tokens guess only after a round that carried them
            self.empty_probe = False
            return 1
        tokens, seconds = self.expected(1)[0]
        step = self.verify_cost(1)
        return 1 if budget and self.probes.due(step, seconds - tokens * step) else 0

    def best_depth(self, deepest: int) -> int:
        """The depth in 0..deepest with the most expected committed tokens per second (the shallowest on ties)."""
        best, best_rate = 0, 1.0 / max(self.verify_cost(1), 1e-9)
        for depth, (tokens, seconds) in enumerate(self.expected(deepest), start=1):
            if tokens / max(seconds, 1e-9) > best_rate:
                best, best_rate = depth, tokens / max(seconds, 1e-9)
        return best

    def expected(self, deepest: int) -> list[tuple[float, float]]:
        """Per draft depth 1..deepest, the tokens a round drafting that deep is expected to commit and its seconds."""
        draft_rate = self.draft_seconds / self.drafted_levels if self.drafted_levels else 0.0
        tokens, reach, nodes = 1.0, 1.0, 0.0
        outcomes = []
        for depth in range(1, deepest + 1):
            level = depth - 1
            reach *= self.present[level].mean() * self.accepted[level].mean(PRIOR_ACCEPTANCE, ACCEPTANCE_PRIOR_WEIGHT)
            tokens += reach
            nodes += self.sizes[level].mean()
            outcomes.append((tokens, self.verify_cost(1 + nodes) + draft_rate * depth))
        return outcomes

    def nodes_that_pay(self, parents: list[int], probs: list[float]) -> list[int] | None:
        """The nodes of a drafted tree worth verifying, ascending (every kept node's parent is kept): the most
        likely ones up to the count with most expected tokens per verify second, at least one (drafting them is
        already paid for, and only verified nodes teach the calibration); before any verify timing, the most likely
        node alone (as the first round's depth: the cheapest draft that says something); None: all of them, or
        uninformative probabilities such as lookups' 1.0."""
        if len(probs) < 2 or min(probs) >= 1.0:
            return None
        paths = path_probs(parents, probs)
        # A child is never likelier than its parent, and parents come first: every prefix of this order is a tree.
        order = sorted(range(len(paths)), key=lambda node: (-paths[node], node))
        if not self.verify_cost.count:
            return order[:1]
        best, best_rate, tokens = 1, 0.0, 1.0
        for count, node in enumerate(order, start=1):
            tokens += self.calibration.expected(paths[node])
            rate = tokens / max(self.verify_cost(1 + count), 1e-9)
            if rate > best_rate:
                best, best_rate = count, rate
        return None if best == len(order) else sorted(order[:best])

    def observe(self, rnd: DraftRound, started: float, limit: int | None) -> None:
        """Learn from a verified round that started at ``started`` (on ``clock``) under ``limit``."""
        if self.rounds:  # the first round runs the prompt too: not a draft-sized forward
            self._pending = (started, len(rnd.nodes), rnd.draft_seconds, len(rnd.committed), limit != 0)
        self.rounds += 1
        depths = [node.depth for node in rnd.nodes]
        self.empty_probe = bool(limit) and not depths
        if not depths:
            return
        self.draft_seconds += rnd.draft_seconds
        self.drafted_levels += max(depths)
        self.deepest = max(self.deepest, *depths)
        for stats in (self.accepted, self.present, self.sizes):
            stats.extend(_Decayed() for _ in range(self.deepest - len(stats)))
        # Every level down to the deepest seen has data: the round that first reached a level had all above it.
        allowed = self.deepest if limit is None else min(limit, self.deepest)
        for depth in range(1, allowed + 1):
            count = depths.count(depth)
            self.present[depth - 1].add(float(count > 0))
            self.sizes[depth - 1].add(float(count))
        for depth, accepted in depth_outcomes(rnd):
            self.accepted[depth - 1].add(float(accepted))
        self._calibrate(rnd)

    def _calibrate(self, rnd: DraftRound) -> None:
        """Each verified node's outcome (on the accepted path or not) against its path probability."""
        probs = [node.draft_prob for node in rnd.nodes]
        if min(probs) >= 1.0:
            return
        on_path = set(rnd.accepted_path)
        for node, path_prob in zip(rnd.nodes, path_probs([node.parent for node in rnd.nodes], probs)):
            self.calibration.add(path_prob, node.id in on_path)
