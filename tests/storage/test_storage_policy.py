"""LFU with decay: hit counting, periodic decay, least-hit victims, admission of prefetches."""

import pytest

from paddle_semoe.storage.policy import LFUDecayPolicy


def test_hits_decay_by_beta_every_k_ticks():
    p = LFUDecayPolicy(4, beta=0.5, decay_every=3)
    p.record([0, 0, 0, 1])
    assert p.hits.tolist() == [3.0, 1.0, 0.0, 0.0]
    assert [p.tick() for _ in range(3)] == [False, False, True]
    assert p.hits.tolist() == [1.5, 0.5, 0.0, 0.0]
    p.record([2])
    for _ in range(3):
        p.tick()
    assert p.hits.tolist() == [0.75, 0.25, 0.5, 0.0]


def test_victim_is_the_least_hit_candidate_then_least_recent_then_lowest_key():
    p = LFUDecayPolicy(5, beta=1.0, decay_every=1)
    p.record([0, 1, 1, 2, 2, 3, 3])
    assert p.victim([0, 1, 2, 3]) == 0
    assert p.victim([1, 2, 3]) == 1  # equal hits: 1 was used before 2 and 3
    assert p.victim([4, 1]) == 4  # never used
    assert p.victim([]) is None
    q = LFUDecayPolicy(3, beta=1.0, decay_every=1)
    assert q.victim([2, 1]) == 1  # all untouched: lowest key


def test_decayed_popularity_loses_to_recent_popularity():
    p = LFUDecayPolicy(2, beta=0.25, decay_every=1)
    p.record([0] * 8)  # expert 0 was hot long ago
    for _ in range(3):
        p.tick()
    p.record([1, 1])  # expert 1 is used now
    assert p.hits[0] == pytest.approx(8 * 0.25**3) and p.hits[1] == 2.0
    assert p.victim([0, 1]) == 0


def test_prefetch_may_only_displace_an_entry_with_no_more_hits():
    p = LFUDecayPolicy(3, beta=1.0, decay_every=1)
    p.record([0, 0, 1])
    assert p.may_displace(0, 1) and not p.may_displace(1, 0) and p.may_displace(2, 2)


def test_watermark():
    p = LFUDecayPolicy(6, beta=1.0, decay_every=1, threshold=0.75)
    assert not p.over_watermark(3, 4) and p.over_watermark(4, 4)


def test_bad_arguments():
    for kwargs, msg in (({"beta": 0.0}, "beta"), ({"decay_every": 0}, "decay_every"), ({"threshold": 1.5}, "threshold")):
        args = {"beta": 0.5, "decay_every": 2, **kwargs}
        with pytest.raises(ValueError, match=msg):
            LFUDecayPolicy(3, **args)
