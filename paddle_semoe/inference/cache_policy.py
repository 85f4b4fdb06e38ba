"""Offline replay of expert-cache eviction policies on recorded routing traces.

The expert cache (:class:`paddle_semoe.inference.cache.ExpertCache`) holds ``capacity`` single-
expert slots over ``L`` MoE layers of ``E`` experts (key ``layer * E + expert``). A decode step
runs the layers in order, each a *request*: the set of keys that layer needs at once (all
resident together, so they cannot evict each other). With pre-gating, layer ``j+1``'s router on
layer ``j``'s input *predicts* layer ``j+1``'s keys before layer ``j`` is requested.

:func:`replay` runs a :class:`Trace` (as ``ExpertCache`` records it with ``record_routing``)
through an :class:`EvictionPolicy` the way the cache does and counts ``hits`` (keys resident
when requested, prefetched ones included: the live hit rate) and ``loads`` (demand misses and
prefetches). ``1 - loads / requests`` is the *load-based* hit rate, the quantity Belady's MIN
(:func:`belady_hits`) maximizes for a capacity, also against prefetching policies; without
prefetch the two rates agree. Policy ties go to the lower score, then the least recently used,
then the lower key. :func:`static_optimum_hit_rate` is the best fixed set of keys in hindsight.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np

#: Keys of one layer use or prediction (``layer * E + expert``, distinct): a sequence or an int64 array.
Keys = Union[Sequence[int], np.ndarray]


# ----------------------------------------------------------------------------- trace
@dataclass(frozen=True)
class Trace:
    """A routing trace of one serving run.

    Attributes:
        layers, experts: L MoE layers of E experts (key = layer * E + expert).
        requests: one ``(layer, expert ids)`` per layer use, in order.
        predictions: ``(before, layer, expert ids)``: a pre-gating prediction for ``layer``
            issued just before request index ``before``.
        start: first request counted (the earlier ones, e.g. the prompt's prefill, only warm
            the cache).
    """

    layers: int
    experts: int
    requests: tuple[tuple[int, tuple[int, ...]], ...]
    predictions: tuple[tuple[int, int, tuple[int, ...]], ...] = ()
    start: int = 0

    def __post_init__(self) -> None:
        if self.layers < 1 or self.experts < 1:
            raise ValueError(f"trace needs layers >= 1 and experts >= 1, got {self.layers} x {self.experts}")
        if not 0 <= self.start <= len(self.requests):
            raise ValueError(f"trace start {self.start} outside its {len(self.requests)} requests")
        for j, ids in self.requests:
            self._check(j, ids, "request")
        for before, j, ids in self.predictions:
            if not 0 <= before <= len(self.requests):
                raise ValueError(f"prediction before request {before}, the trace has {len(self.requests)}")
            self._check(j, ids, "prediction")

    def _check(self, j: int, ids: Sequence[int], what: str) -> None:
        if not 0 <= j < self.layers:
            raise ValueError(f"{what} for layer {j}, the trace has {self.layers} layers")
        if any(not 0 <= e < self.experts for e in ids):
            raise ValueError(f"{what} for layer {j} names experts {list(ids)} outside 0..{self.experts - 1}")

    @classmethod
    def of(cls, layers: int, experts: int, requests: Iterable[tuple[int, Iterable[int]]],
           predictions: Iterable[tuple[int, int, Iterable[int]]] = (), start: int = 0) -> "Trace":
        """Normalizing constructor: expert ids become sorted, de-duplicated int tuples."""
        req = tuple((int(j), tuple(sorted({int(e) for e in ids}))) for j, ids in requests)
        pred = tuple((int(b), int(j), tuple(sorted({int(e) for e in ids}))) for b, j, ids in predictions)
        return cls(layers, experts, req, pred, start)

    def keys(self, i: int) -> list[int]:
        """Keys of request ``i``."""
        j, ids = self.requests[i]
        return [j * self.experts + e for e in ids]

    def counted(self) -> int:
        """Keys requested from ``start`` on."""
        return sum(len(ids) for _, ids in self.requests[self.start :])


# ----------------------------------------------------------------------------- Belady
def belady_hits(requests: Sequence[Sequence[int]], capacity: int) -> list[int]:
    """Hits per request of the offline-optimal demand-paged cache (Belady/MIN).

    ``requests``: each the keys one layer use needs at once (all resident together); a miss
    evicts the resident key, not in the current request, whose next use is farthest in the
    future (never used again first; ties: the lower key). MIN also minimizes the misses of every
    prefix of the trace, so the hits from any index on are the optimum's hits of that window.
    ``capacity`` >= the largest request."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    reqs = [sorted({int(k) for k in r}) for r in requests]
    big = max((len(r) for r in reqs), default=0)
    if big > capacity:
        raise ValueError(f"a request needs {big} keys at once, more than capacity {capacity}")
    inf = len(reqs) + 1
    next_use: list[dict[int, int]] = [dict() for _ in reqs]
    last: dict[int, int] = {}
    for i in range(len(reqs) - 1, -1, -1):
        for k in reqs[i]:
            next_use[i][k] = last.get(k, inf)
            last[k] = i
    resident: dict[int, int] = {}  # key -> index of its next use
    out = []
    for i, r in enumerate(reqs):
        missing = [k for k in r if k not in resident]
        out.append(len(r) - len(missing))
        need = len(resident) + len(missing) - capacity
        if need > 0:
            current = set(r)
            victims = sorted((k for k in resident if k not in current), key=lambda k: (-resident[k], k))[:need]
            for k in victims:
                del resident[k]
        for k in r:
            resident[k] = next_use[i][k]
    return out


def belady_hit_rate(requests: Sequence[Sequence[int]], capacity: int, start: int = 0) -> float:
    """Hit rate of the offline-optimal cache (:func:`belady_hits`) on requests of keys needed at
    once; ``capacity`` >= the largest request. Requests before ``start`` warm the cache uncounted
    (MIN is optimal for every prefix, so the window's count is the optimum's)."""
    hits = belady_hits(requests, capacity)
    total = sum(len(set(r)) for r in requests[start:])
    return sum(hits[start:]) / total if total else 0.0


def belady_hit_rate_of(trace: Trace, capacity: int) -> float:
    """Belady's hit rate over the counted window of ``trace`` (the whole trace replayed)."""
    requests = [trace.keys(i) for i in range(len(trace.requests))]
    return belady_hit_rate(requests, capacity, trace.start)


def static_optimum_hit_rate(trace: Trace, capacity: int) -> float:
    """Hit rate of the best *fixed* set of ``capacity`` keys over the counted window, chosen in
    hindsight (the window's most requested keys) and loaded before it for free.

    If routing were an independent draw per step (the independent reference model), the best
    online policy would keep the ``capacity`` most probable keys (Aho, Denning & Ullman's A0);
    this is that policy with the probabilities known exactly from the future, so an optimistic
    estimate of what frequency-based online eviction can reach on the trace."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    counts = Counter(k for i in range(trace.start, len(trace.requests)) for k in trace.keys(i))
    n = trace.counted()
    return sum(sorted(counts.values(), reverse=True)[:capacity]) / n if n else 0.0


# ----------------------------------------------------------------------------- policies
class EvictionPolicy:
    """Replacement bookkeeping of an expert cache (the replay calls it; so does ExpertCache).
    The hooks ``predict``, ``inserted`` and ``evicted`` do nothing unless overridden."""

    name: str

    def reset(self, layers: int, experts: int, capacity: int) -> None:
        """Forget everything; a cache of ``capacity`` slots over ``layers`` x ``experts`` keys."""
        raise NotImplementedError

    def record(self, layer: int, keys: Keys) -> None:
        """Layer ``layer`` is about to run and uses ``keys`` (called before their loads)."""
        raise NotImplementedError

    def predict(self, layer: int, keys: Keys) -> None:
        """Pre-gating names ``keys`` for ``layer`` (its next use)."""

    def inserted(self, key: int) -> None:
        """``key`` was loaded into a slot."""

    def evicted(self, key: int) -> None:
        """``key`` left its slot."""

    def victim(self, candidates: np.ndarray, incoming: int, speculative: bool) -> int | None:
        """The key among ``candidates`` (resident, evictable; int64, non-empty) to evict for
        ``incoming`` (-1: not known); for a ``speculative`` (prefetch) load, None refuses the
        displacement."""
        raise NotImplementedError


class _ScoredPolicy(EvictionPolicy):
    """Shared state: hit counters decayed by ``beta`` every ``decay_every`` forward passes (a
    pass starts when a layer no later than the previous one runs), a use clock, the layer that
    ran last. Subclasses give ``keep(keys)``: the lower, the sooner evicted; ``margin`` scales
    the incoming key's keep-priority when a prefetch asks to displace a victim."""

    name = "scored"

    def __init__(self, beta: float = 0.9, margin: float = 1.0, decay_every: int = 1):
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if margin <= 0.0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if decay_every < 1:
            raise ValueError(f"decay_every must be >= 1, got {decay_every}")
        self.beta = beta
        self.margin = margin
        self.decay_every = decay_every
        self.reset(1, 1, 1)

    def reset(self, layers: int, experts: int, capacity: int) -> None:
        self.L, self.E, self.capacity = layers, experts, capacity
        self.hits = np.zeros(layers * experts, np.float64)
        self.last_use = np.full(layers * experts, -1, np.int64)
        self.clock = 0
        self.passes = 0
        self.layer = -1

    def record(self, layer: int, keys: Keys) -> None:
        if layer <= self.layer:  # a new forward pass
            self.passes += 1
            if self.passes % self.decay_every == 0:
                self.hits *= self.beta
        self.layer = layer
        k = np.asarray(keys, np.int64)  # distinct keys: one use each, clock in the order given
        self.hits[k] += 1.0
        self.last_use[k] = self.clock + np.arange(1, k.size + 1)
        self.clock += k.size

    def distance(self, keys: np.ndarray) -> np.ndarray:
        """Layers until each key's layer runs again (1: the next layer; L: the one that just ran)."""
        return (keys // self.E - self.layer - 1) % self.L + 1

    def keep(self, keys: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def victim(self, candidates: np.ndarray, incoming: int, speculative: bool) -> int | None:
        score = self.keep(candidates)
        i = int(np.lexsort((candidates, self.last_use[candidates], score))[0])
        # a prefetch displaces the victim only if margin * (incoming key's keep) >= victim's keep
        if speculative and not self.margin * self.keep(np.array([incoming]))[0] >= score[i]:
            return None
        return int(candidates[i])


class LRUPolicy(_ScoredPolicy):
    """Least recently used (every key keeps priority 0, so a prefetch may displace any key)."""

    name = "lru"

    def keep(self, keys: np.ndarray) -> np.ndarray:
        return np.zeros(len(keys))


class LFUDecayPolicy(_ScoredPolicy):
    """Least decayed hits (hit counters times ``beta`` every forward pass; LRFU's combined
    recency-frequency with the forward pass as its clock)."""

    name = "lfu_decay"

    def keep(self, keys: np.ndarray) -> np.ndarray:
        return self.hits[keys]


class LayerDistancePolicy(_ScoredPolicy):
    """Decayed hits divided by the layers until the key's layer runs again.

    A forward runs the MoE layers in order, so the layer that just ran is needed farthest in the
    future (distance L) and the next one soonest (1): Belady's "farthest next use", estimated,
    times LFU's reuse estimate. The expert cache's default: replayed demand-paged on 18 decode
    traces of the benchmark model (8 layers x 64 experts, top-4, 128 slots), it was the best or
    within 2 points of the best policy here (batch 1: 0.39, LRU 0.35; batch 8: 0.29, LRU 0.00,
    which the cyclic layer order defeats; Belady 0.67 / 0.52), and with pre-gating it kept the
    most prefetches."""

    name = "lfu_decay_dist"

    def keep(self, keys: np.ndarray) -> np.ndarray:
        return self.hits[keys] / self.distance(keys)


class NextUsePolicy(_ScoredPolicy):
    """Belady with an estimated future: evict the key whose next use is expected farthest away.

    Requests come one layer at a time in a fixed cycle, so a key's next use is
    ``distance + L * g`` layer uses away, ``g`` the steps until its expert is used again. With
    the expert used in a share ``p`` of the forward passes (decayed hits over decayed passes,
    ``prior`` added to the hits), ``g ~ 1/p - 1`` (memoryless reuse). A key pre-gating named for
    its layer's next run is used then with probability ``confidence`` (about the prediction's
    precision), so its estimate becomes ``distance + (1 - confidence) * L * g``. A prefetch may
    displace a key expected no sooner than the incoming one."""

    name = "next_use"

    def __init__(self, beta: float = 0.9, prior: float = 0.05, confidence: float = 0.0):
        if not 0.0 < prior <= 1.0:
            raise ValueError(f"prior must be in (0, 1], got {prior}")
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {confidence}")
        self.prior = prior
        self.confidence = confidence
        super().__init__(beta)

    def reset(self, layers: int, experts: int, capacity: int) -> None:
        super().reset(layers, experts, capacity)
        self.weight = 0.0  # decayed number of passes
        self.predicted = np.zeros(layers * experts, bool)

    def record(self, layer: int, keys: Keys) -> None:
        if layer <= self.layer or self.weight == 0.0:
            self.weight = self.weight * self.beta + 1.0 if self.weight else 1.0
        self.predicted[layer * self.E : (layer + 1) * self.E] = False
        super().record(layer, keys)

    def predict(self, layer: int, keys: Keys) -> None:
        self.predicted[layer * self.E : (layer + 1) * self.E] = False
        self.predicted[np.asarray(keys, np.int64)] = True

    def keep(self, keys: np.ndarray) -> np.ndarray:
        p = np.minimum((self.hits[keys] + self.prior) / (self.weight + 1.0), 1.0)
        later = self.L * (1.0 / p - 1.0)
        later = np.where(self.predicted[keys], (1.0 - self.confidence) * later, later)
        return -(self.distance(keys) + later)


class PartitionedPolicy(EvictionPolicy):
    """``capacity // L`` slots per layer (the remainder to the first layers); the base policy
    picks the victim among the keys of the incoming key's layer (unknown incoming key: the layer
    last recorded, whose demand loads these are) when that layer is at its quota, else among
    the layers over their quota."""

    def __init__(self, base: _ScoredPolicy):
        self.base = base
        self.name = f"partitioned_{base.name}"

    def reset(self, layers: int, experts: int, capacity: int) -> None:
        self.base.reset(layers, experts, capacity)
        self.E = experts
        q, r = divmod(capacity, layers)
        self.quota = np.array([q + (1 if j < r else 0) for j in range(layers)])
        self.count = np.zeros(layers, np.int64)
        self.layer = 0

    def record(self, layer: int, keys: Keys) -> None:
        self.layer = layer
        self.base.record(layer, keys)

    def predict(self, layer: int, keys: Keys) -> None:
        self.base.predict(layer, keys)

    def inserted(self, key: int) -> None:
        self.count[key // self.E] += 1

    def evicted(self, key: int) -> None:
        self.count[key // self.E] -= 1

    def victim(self, candidates: np.ndarray, incoming: int, speculative: bool) -> int | None:
        lay = candidates // self.E
        j = incoming // self.E if incoming >= 0 else self.layer  # unknown: a demand load of the running layer
        if self.count[j] >= self.quota[j]:
            pool = candidates[lay == j]
        else:
            pool = candidates[self.count[lay] > self.quota[lay]]
        if pool.size == 0:
            pool = candidates
        return self.base.victim(pool, incoming, speculative)


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha): T1 holds keys seen once recently, T2 keys
    seen at least twice; ghost lists B1/B2 remember recent evictions from each and move the
    target size ``p`` of T1. The victim is the least recently used evictable key of T1 when T1
    exceeds ``p``, else of T2 (falling back to the other list). Prefetches enter T1 and may
    always displace."""

    name = "arc"

    def reset(self, layers: int, experts: int, capacity: int) -> None:
        self.c = capacity
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()

    def record(self, layer: int, keys: Keys) -> None:
        for k in (int(x) for x in keys):
            if k in self.t1:
                del self.t1[k]
                self.t2[k] = None
            elif k in self.t2:
                self.t2.move_to_end(k)
            elif k in self.b1:
                self.p = min(self.c, self.p + max(1.0, len(self.b2) / max(len(self.b1), 1)))
                del self.b1[k]
                self.t2[k] = None
            elif k in self.b2:
                self.p = max(0.0, self.p - max(1.0, len(self.b1) / max(len(self.b2), 1)))
                del self.b2[k]
                self.t2[k] = None
            else:
                self.t1[k] = None

    def inserted(self, key: int) -> None:
        if key not in self.t1 and key not in self.t2:
            self.t1[key] = None

    def evicted(self, key: int) -> None:
        for lst, ghost in ((self.t1, self.b1), (self.t2, self.b2)):
            if key in lst:
                del lst[key]
                ghost[key] = None
                while len(ghost) > self.c:
                    ghost.popitem(last=False)

    def victim(self, candidates: np.ndarray, incoming: int, speculative: bool) -> int | None:
        ok = set(int(k) for k in candidates)
        first, second = (self.t1, self.t2) if len(self.t1) > self.p else (self.t2, self.t1)
        # none tracked: resident but untracked (cannot happen through replay)
        return next((k for lst in (first, second) for k in lst if k in ok), int(candidates.min()))


class PregateAwarePolicy(EvictionPolicy):
    """A base policy that never evicts a key of the latest pre-gating prediction while its
    layer has not run yet (unless every candidate is protected)."""

    def __init__(self, base: EvictionPolicy):
        self.base = base
        self.name = f"pregate_{base.name}"

    def reset(self, layers: int, experts: int, capacity: int) -> None:
        self.base.reset(layers, experts, capacity)
        self.E = experts
        self.protected: dict[int, set[int]] = {}

    def record(self, layer: int, keys: Keys) -> None:
        self.protected.pop(layer, None)
        self.base.record(layer, keys)

    def predict(self, layer: int, keys: Keys) -> None:
        self.protected[layer] = set(int(k) for k in keys)
        self.base.predict(layer, keys)

    def inserted(self, key: int) -> None:
        self.base.inserted(key)

    def evicted(self, key: int) -> None:
        self.base.evicted(key)

    def victim(self, candidates: np.ndarray, incoming: int, speculative: bool) -> int | None:
        guard = set().union(*self.protected.values()) if self.protected else set()
        free = candidates[np.array([int(k) not in guard for k in candidates], bool)]
        return self.base.victim(free if free.size else candidates, incoming, speculative)


# ----------------------------------------------------------------------------- replay
@dataclass
class ReplayResult:
    """Counts over the trace's counted window (requests from ``Trace.start`` on)."""

    policy: str
    requests: int = 0
    hits: int = 0  # resident when requested (prefetched keys included)
    demand_loads: int = 0
    prefetch_loads: int = 0
    prefetch_used: int = 0  # prefetched keys requested before their eviction

    @property
    def loads(self) -> int:
        return self.demand_loads + self.prefetch_loads

    @property
    def hit_rate(self) -> float:
        """Live hit rate: hits / requests (a prefetch that arrived in time counts as a hit)."""
        return self.hits / self.requests if self.requests else 0.0

    @property
    def load_hit_rate(self) -> float:
        """1 - loads / requests: comparable with Belady (every load, wasted prefetches included)."""
        return 1.0 - self.loads / self.requests if self.requests else 0.0


def replay(trace: Trace, capacity: int, policy: EvictionPolicy, prefetch: bool = True) -> ReplayResult:
    """Run ``trace`` through a cache of ``capacity`` slots evicting with ``policy``.

    Per request, as :class:`~paddle_semoe.inference.cache.ExpertCache` does: the predictions
    issued before it are offered first (with ``prefetch``: each absent predicted key takes an
    empty slot, else the policy's speculative victim among keys not loaded by the same
    prediction); then ``policy.record``; the request's resident keys are pinned, each miss takes
    an empty slot, else the policy's victim among the unpinned keys. Loads finish at once."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    E = trace.experts
    policy.reset(trace.layers, E, capacity)
    resident: set[int] = set()
    by_prefetch: set[int] = set()
    res = ReplayResult(policy.name)
    preds: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
    for before, j, ids in trace.predictions:
        preds.setdefault(before, []).append((j, ids))

    def evict(pool: set[int], incoming: int, speculative: bool) -> bool:
        if len(resident) < capacity:
            return True
        cand = np.array(sorted(resident - pool), np.int64)
        if cand.size == 0:
            return False
        v = policy.victim(cand, incoming, speculative)
        if v is None:
            return False
        resident.discard(v)
        by_prefetch.discard(v)
        policy.evicted(v)
        return True

    for i, (j, ids) in enumerate(trace.requests):
        counted = i >= trace.start
        for pj, pids in preds.get(i, ()):
            pkeys = [pj * E + e for e in pids]
            policy.predict(pj, pkeys)
            if not prefetch:
                continue
            fresh: set[int] = set()
            for k in pkeys:
                if k in resident or not evict(fresh, k, True):
                    continue
                resident.add(k)
                by_prefetch.add(k)
                fresh.add(k)
                policy.inserted(k)
                res.prefetch_loads += counted
        keys = [j * E + e for e in ids]
        if len(keys) > capacity:
            raise ValueError(f"request {i} needs {len(keys)} keys at once, more than capacity {capacity}")
        policy.record(j, keys)
        pinned = set(k for k in keys if k in resident)
        hits = len(pinned)
        if counted:
            res.prefetch_used += len(pinned & by_prefetch)
        by_prefetch -= pinned
        for k in keys:
            if k in resident:
                continue
            if not evict(pinned, k, False):
                raise RuntimeError("replay: no evictable key for a demand miss")  # capacity >= request
            resident.add(k)
            pinned.add(k)
            policy.inserted(k)
            res.demand_loads += counted
        if counted:
            res.requests += len(keys)
            res.hits += hits
    return res


def compare(trace: Trace, capacity: int, policies: Sequence[EvictionPolicy] | None = None) -> dict[str, dict[str, float]]:
    """Every policy (None: each policy here) with and without prefetch, Belady and the hindsight
    static optimum (:func:`static_optimum_hit_rate`) on one trace: ``{name: {"hit": live rate,
    "load": load-based rate}}`` (``belady`` and ``static_optimum`` have both equal)."""
    if policies is None:
        policies = [
            LRUPolicy(), LFUDecayPolicy(0.9), LayerDistancePolicy(0.9), NextUsePolicy(0.9),
            PartitionedPolicy(LRUPolicy()), PartitionedPolicy(LFUDecayPolicy(0.9)), ARCPolicy(),
            PregateAwarePolicy(LayerDistancePolicy(0.9)), PregateAwarePolicy(NextUsePolicy(0.9)),
        ]
    b = belady_hit_rate_of(trace, capacity)
    st = static_optimum_hit_rate(trace, capacity)
    out = {"belady": {"hit": b, "load": b}, "static_optimum": {"hit": st, "load": st}}
    for pol in policies:
        for pf in (False, True):
            r = replay(trace, capacity, pol, prefetch=pf)
            out[pol.name + ("+prefetch" if pf else "")] = {"hit": r.hit_rate, "load": r.load_hit_rate}
    return out
