"""The bench's statistics (bench/stats.py): the numbers the hand-written code gave before they
moved to numpy, and the committed baseline reproduced from its own raw runs."""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np

from bench import gate, results
from bench.stats import median, pair_kinds, quantile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PING_US = [41.0, 25.0, 26.0, 33.0, 30.0, 29.0, 118.0, 27.0]  # a ping's RTTs, ms x 1000
TCP_GBPS = [14.215861430924136, 14.548781210023243, 13.9, 9.71, 14.6012]
CONVERGE_S = [0.41, 0.52, 0.47, 0.8, 1.3, 0.44, 0.61]


def same(a, b) -> bool:
    """Equal, and of the same type: the result document writes 0 and 0.0 differently."""
    return type(a) is type(b) and a == b


def test_median_gives_what_the_old_code_gave():
    # the old code: statistics.median over the values that are neither None nor NaN
    assert same(median(TCP_GBPS), 14.215861430924136)
    assert same(median(PING_US), 29.5)
    assert same(median([0, 3, 1]), 1)  # an odd count of integers: an integer (retransmits)
    assert same(median([0, 3, 1, 2]), 1.5)
    assert same(median([0, 2]), 1.0)
    assert same(median([None, 2.5, float("nan"), 1]), 1.75)
    assert same(median(np.array([3.0, np.nan, 1.0, 2.0])), 2.0)
    assert median([]) is None and median([None, float("nan")]) is None


def test_quantile_gives_what_the_old_code_gave():
    # the old code: v = sorted(values); k = (n - 1) * q; v[lo] + (v[hi] - v[lo]) * (k - lo)
    assert [quantile(PING_US, q) for q in (0.5, 0.75, 0.99)] == [29.5, 35.0, 112.60999999999999]
    assert [quantile(TCP_GBPS, q) for q in (0.5, 0.75, 0.99)] == [14.215861430924136, 14.548781210023243,
                                                                 14.59910324840093]
    assert [quantile(CONVERGE_S, q) for q in (0.5, 0.99)] == [0.52, 1.2699999999999998]
    assert same(quantile([1, 2, 3, 4], 0.5), 2.5) and same(quantile([5], 0.99), 5.0)
    assert math.isnan(quantile([], 0.5))
    # numpy interpolates down from the upper neighbour when the fraction is 0.5 or more, the old
    # code always up from the lower one: here that is one ulp (the old 17.123199999999997), and
    # numpy's is the nearer to the exact 17.1232. No printed number of the bench shows that digit.
    old = 17.123199999999997
    new = quantile([11.28, 11.44, 8.55, 17.36, 5.41], 0.99)
    assert new == 17.1232 and abs(new - old) == math.ulp(old) and f"{new:.4f}" == f"{old:.4f}"


def test_pair_kinds():
    kinds = pair_kinds([False, True, False, True], [False, True, True, False])
    assert {k: v.tolist() for k, v in kinds.items()} == {
        "calm": [True, False, False, False], "spell": [False, True, False, False],
        "mixed": [False, False, True, True]}


def _runs_by_document(runs: list[dict]) -> list[list[dict]]:
    """A baseline's runs back into the runs of each document it merged: a document lists its
    backends' runs one backend after another, each from repeat 1, the first backend first."""
    first = runs[0]["backend"]
    docs: list[list[dict]] = []
    for r in runs:
        if r["backend"] == first and r["repeat"] == 1:
            docs.append([])
        docs[-1].append(r)
    return docs


def test_committed_baseline_is_reproduced_from_its_raw_runs():
    """bench/baselines/quick.json keeps every raw run of the runs it merged: summarising each
    run's samples again (medians, paired ratios with their spell classification) and merging
    them gives the committed numbers exactly, of the same types."""
    with open(os.path.join(REPO, "bench", "baselines", "quick.json")) as f:
        baseline = json.load(f)
    by_doc = _runs_by_document(baseline["runs"])
    assert len(by_doc) == len(baseline["baseline"]["created"])
    docs = []
    for runs in by_doc:
        doc = {"backends": {}, "runs": runs, "plan": copy.deepcopy(baseline["plan"])}
        for name in dict.fromkeys(r["backend"] for r in runs):
            kept = baseline["backends"][name]
            extra = {k: kept[k] for k in ("daemon_rss_mb", "engine_rss_mb", "lab") if k in kept}
            doc["backends"][name] = results.summarize([r for r in runs if r["backend"] == name], extra,
                                                      seconds=kept["seconds"])
        results.add_ratios(doc)
        docs.append(doc)
    merged = gate.merge_baseline(docs)["backends"]
    assert set(merged) == set(baseline["backends"])
    for name, want in baseline["backends"].items():
        got = merged[name]
        differ = {k: (want.get(k), got.get(k)) for k in set(want) | set(got)
                  if not same(want.get(k), got.get(k))}
        assert not differ, f"{name}: {differ}"
