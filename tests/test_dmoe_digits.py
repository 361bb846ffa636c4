"""The digits example (``examples/dmoe_digits.py``) trains through a mixture of experts on peers that fail:

- one peer is killed (kill -9) before the first step: every loss and weight stays finite and the accuracy is that
  of a working model (hivemind 1.1.12's layer made every weight NaN at step 0 in the same situation; issue #21);
- every peer refuses 10% or 50% of its requests (``join --fail-rate``): the accuracy stays within 2 points of the
  run without failures (the protocol of research notes §7.3, whose in-process emulation measured 0.976 / 0.972
  without failures, 0.980 / 0.967 at 10% and 0.981 / 0.961 at 50%).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "dmoe_digits.py"


def _example(*args: str, timeout: float = 220) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--peers", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _trained(result: subprocess.CompletedProcess) -> tuple[float, int, int]:
    """(accuracy, failed requests, requests) from the example's last line."""
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"accuracy (\S+) after .*; (\d+) of (\d+) expert requests failed", result.stdout)
    assert match, result.stdout
    return float(match[1]), int(match[2]), int(match[3])


@pytest.mark.timeout(480)
def test_digits_train_with_a_killed_expert_peer():
    accuracy, _, _ = _trained(result := _example("--steps", "200", "--kill-one"))
    assert "killed experts 0" in result.stdout
    assert accuracy >= 0.85, result.stdout  # 0.95 after 300 steps here; an untrained model scores about 0.1
    # control: a layer that keeps calling the dead peer's experts (their records live on) soon meets a batch with a
    # sample whose experts are all there, and stops with a clear error
    result = _example("--steps", "200", "--kill-one", "--avoid-seconds", "0")
    assert result.returncode != 0 and "RoutingError" in result.stderr, result.stderr[-3000:]
    assert "got fewer than k_min=1 expert answers" in result.stderr


# 2 peers, batch 32, lr 3e-3, k_min 0: a sample none of whose experts answered passes through the residual alone
TRAINING = ("--steps", "100", "--batch", "32", "--lr", "3e-3", "--k-min", "0")


@pytest.mark.timeout(400)
def test_digits_train_through_failed_expert_calls():
    """Every peer refuses 10%, then 50% of its requests (``--fail-rate``): the accuracy stays within 2 points of the
    run without failures.

    Calibrated once here (2 shared CPU cores, a CI run beside; ~110 s for the four runs): after 100 steps, 0.959
    without failures, 0.957 at 10% (46 of 409 requests failed), 0.952 at 50% (166 of 330); after 80 steps 0.956,
    0.946, 0.952 (too close to the bound); after 150 steps 0.954, 0.957, 0.956 -- and 0.948 with every request
    refused: on digits the residual path alone (a linear classifier through a LayerNorm) scores nearly as well, so
    accuracy cannot tell a working mixture from a dead one; what shows that the failures are real is the share of
    failed requests and the control below.
    """
    accuracy = {}
    for rate in (0.0, 0.1, 0.5):
        accuracy[rate], failed, sent = _trained(_example(*TRAINING, "--fail-rate", str(rate)))
        print(f"fail rate {rate}: accuracy {accuracy[rate]:.3f}, {failed} of {sent} requests failed")
        # the seam is real: about that share of the requests failed (drawn independently per request)
        assert abs(failed / sent - rate) < 0.08, (rate, failed, sent)
    assert accuracy[0.0] >= 0.9, accuracy
    assert accuracy[0.1] >= accuracy[0.0] - 0.02, accuracy
    assert accuracy[0.5] >= accuracy[0.0] - 0.02, accuracy
    # control: with k_min=1 the same failures soon leave a sample of a batch without answers twice in a row, and the
    # layer stops with a clear error (a short sample, never NaN)
    result = _example(*TRAINING[:-2], "--k-min", "1", "--fail-rate", "0.5")
    assert result.returncode != 0, result.stdout
    assert "got fewer than k_min=1 expert answers" in result.stderr, result.stderr[-3000:]
