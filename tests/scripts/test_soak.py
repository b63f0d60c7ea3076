"""scripts/soak.py at the CI size: a thousand hostile random requests (shared
prefixes, n up to 4, stop strings and ids, penalties, logprobs, constant preemption, aborts,
malformed requests, snapshot + restore and weight updates along the way) with every invariant
checked; the run must report zero violations and must really have exercised each fault."""

from __future__ import annotations

import pytest

from script_loader import load_script


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_soak_reports_no_violation(assets_dir):
    soak = load_script("soak")
    out = soak.main(["--model", str(assets_dir / "stories260K"), "--requests", "1000", "--minutes", "4",
                     "--snapshot-every", "150", "--update-every", "200", "--verify", "0.05"])
    assert out["violations"] == 0, out["violation_examples"]
    assert out["requests"] >= 800  # the time cap must not have cut it to a token run
    for what in ("preemptions", "aborts", "rejected_bad_requests", "snapshots", "verified"):
        assert out.get(what, 0) > 0, (what, out)
    assert out.get("weight_updates_recompute", 0) + out.get("weight_updates_keep", 0) > 0
