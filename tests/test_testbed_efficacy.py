"""guard.testbed.efficacy: the selection rule (lowest replication among settings within 15% of CFG's alignment)."""

from types import SimpleNamespace

import numpy as np

from guard.testbed.efficacy import is_eligible, select_best


def _result(name, own, memorized, plain):
    return SimpleNamespace(
        name=name,
        own_ssim=np.array([own]),
        memorized_alignment=np.array([memorized]),
        plain_alignment=np.array([plain]),
    )


def test_lowest_replication_within_the_alignment_budget_wins():
    cfg = _result("cfg", 0.95, 0.8, 1.0)
    keeps = _result("keeps", 0.7, 0.8, 0.9)
    better = _result("better", 0.5, 0.7, 0.86)
    breaks_plain = _result("breaks plain", 0.1, 0.9, 0.84)
    breaks_memorized = _result("breaks memorized", 0.1, 0.67, 1.0)
    assert [is_eligible(r, cfg) for r in (keeps, better, breaks_plain, breaks_memorized)] == [True, True, False, False]
    assert select_best([keeps, breaks_plain, better, breaks_memorized], cfg) is better
    assert select_best([breaks_plain, breaks_memorized], cfg) is None
