"""Robust aggregators: several peers' versions of one vector in, one vector out, which a few dishonest inputs cannot
drag far from what the honest ones agree on.

Shape legend: N inputs (one per peer), D coordinates.

Every aggregator is a function of ``x_ND`` (float, finite: check with ``finite_inputs`` first; a NaN or an
infinity defeats most of them) returning ``aggregate_D``. Pass a ``Report`` to learn how much each input counted::

    report = Report()
    v_D = centered_clip(x_ND, report=report)
    report.weights_N    # each input's share of the result (they sum to 1)
    report.distances_N  # each input's distance from the result

The rules, and how many dishonest inputs ``f`` of N each tolerates:

- ``mean``: none (one input can move it anywhere); the control in every robustness test.
- ``median``: coordinate-wise; the average of the two middle values when N is even (as NumPy); f < N/2.
- ``trimmed_mean(trim)``: coordinate-wise, drops the ``trim`` lowest and highest values; f <= trim < N/2.
- ``krum(f, m)``: scores each input by its summed squared distance to its N - f - 1 nearest others and averages
  the ``m`` best (Blanchard et al., NeurIPS 2017; m > 1 is Multi-Krum); needs 2f + 2 < N.
- ``geometric_median``: the point of least summed distance (smoothed Weiszfeld iterations from the median).
- ``centered_clip(tau)``: from the coordinate-wise median, ``v += mean_i clip(x_i - v, tau)`` until the step is
  small, where clip scales a vector to norm at most ``tau`` (Karimireddy et al., ICML 2021, as run by BTARD,
  Gorbunov et al., ICML 2022: median start, iterated to convergence). An input moves the result by at most
  ``tau / N`` per iteration. ``tau`` defaults to the honest spread: the median of the inputs' distances from the
  coordinate-wise median, which more than half of the inputs set.

``make(name, byzantine=...)`` gives the rule the ``--aggregator`` option names, as a function of ``x_ND`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from swarm_peer.errors import ValidationError

__all__ = [
    "AGGREGATORS",
    "Report",
    "centered_clip",
    "finite_inputs",
    "geometric_median",
    "krum",
    "make",
    "mean",
    "median",
    "trimmed_mean",
]


@dataclass
class Report:
    """How much each input counted in an aggregate: filled by the aggregator it is passed to."""

    weights_N: torch.Tensor | None = None  # each input's share of the result; sums to 1
    distances_N: torch.Tensor | None = None  # ||x_i - result||


def finite_inputs(x_ND: torch.Tensor) -> torch.Tensor:
    """Which inputs (rows) hold only finite values: a boolean mask of shape [N]."""
    return torch.isfinite(x_ND).all(dim=1)


def mean(x_ND: torch.Tensor, *, report: Report | None = None) -> torch.Tensor:
    N = _check(x_ND)
    result_D = x_ND.mean(dim=0)
    _fill(report, x_ND, result_D, torch.full((N,), 1.0 / N))
    return result_D


def median(x_ND: torch.Tensor, *, report: Report | None = None) -> torch.Tensor:
    N = _check(x_ND)
    middle = [N // 2] if N % 2 else [N // 2 - 1, N // 2]
    result_D = _sorted(x_ND)[middle].mean(dim=0)
    if report is not None:
        counts_N = torch.zeros(N)
        for row in x_ND.argsort(dim=0)[middle]:  # each middle value is half (or all) of a coordinate's result
            counts_N += torch.bincount(row, minlength=N).float() / len(middle)
        _fill(report, x_ND, result_D, counts_N / x_ND.shape[1])
    return result_D


def trimmed_mean(x_ND: torch.Tensor, trim: int, *, report: Report | None = None) -> torch.Tensor:
    N = _check(x_ND)
    if not (0 <= trim and 2 * trim < N):
        raise ValidationError(f"trimmed_mean needs 0 <= trim < N/2, got trim={trim} for N={N}")
    if trim == 0:
        return mean(x_ND, report=report)
    result_D = _sorted(x_ND)[trim : N - trim].mean(dim=0)
    if report is not None:
        kept_N = torch.bincount(x_ND.argsort(dim=0)[trim : N - trim].flatten(), minlength=N).float()
        _fill(report, x_ND, result_D, kept_N / kept_N.sum())
    return result_D


def krum(x_ND: torch.Tensor, f: int, m: int = 1, *, report: Report | None = None) -> torch.Tensor:
    N = _check(x_ND)
    if f < 0 or (f > 0 and 2 * f + 2 >= N) or not 1 <= m <= N:
        raise ValidationError(f"krum needs 2f + 2 < N and 1 <= m <= N, got f={f}, m={m} for N={N}")
    distances_NN = torch.cdist(x_ND[None].double(), x_ND[None].double())[0] ** 2
    # each input's distances to the others, nearest first (its distance 0 to itself is dropped)
    nearest_NK = distances_NN.sort(dim=1).values[:, 1 : N - f]
    chosen_M = nearest_NK.sum(dim=1).argsort()[:m]
    result_D = x_ND[chosen_M].mean(dim=0)
    weights_N = torch.zeros(N)
    weights_N[chosen_M] = 1.0 / m
    _fill(report, x_ND, result_D, weights_N)
    return result_D


def geometric_median(
    x_ND: torch.Tensor,
    *,
    iterations: int = 200,
    eps: float = 1e-7,
    nu: float | None = None,
    report: Report | None = None,
) -> torch.Tensor:
    """Weiszfeld's iterations ``z = sum_i w_i x_i / sum_i w_i``, ``w_i = 1 / max(||x_i - z||, nu)``, from the
    coordinate-wise median, until a step is below ``eps`` times the inputs' spread. ``nu`` (default: 1e-9 of that
    spread) keeps an input that ``z`` lands on from taking all the weight."""
    _check(x_ND)
    dtype, x_ND = x_ND.dtype, x_ND.double()
    z_D = median(x_ND)
    spread = (x_ND - z_D).norm(dim=1).median().item() or 1.0
    nu = spread * 1e-9 if nu is None else nu
    for _ in range(iterations):
        w_N = 1.0 / (x_ND - z_D).norm(dim=1).clamp(min=nu)
        previous_D, z_D = z_D, (w_N[:, None] * x_ND).sum(dim=0) / w_N.sum()
        if (z_D - previous_D).norm() <= eps * spread:
            break
    w_N = 1.0 / (x_ND - z_D).norm(dim=1).clamp(min=nu)
    _fill(report, x_ND, z_D, w_N / w_N.sum())
    return z_D.to(dtype)


def centered_clip(
    x_ND: torch.Tensor,
    tau: float | None = None,
    *,
    iterations: int = 100,
    eps: float = 1e-6,
    report: Report | None = None,
) -> torch.Tensor:
    """BTARD's CenteredClip: from the coordinate-wise median m, ``v += mean_i(x_i - v) * min(1, tau / ||x_i - v||)``
    until a step is at most ``eps * tau`` or ``iterations`` ran. ``tau`` defaults to the honest spread (module
    docstring).

    Computed on y_i = x_i - m, with u = v - m: each iteration needs only y @ u and s @ y (two passes over the
    inputs), the distances coming from ||y_i - u||^2 = ||y_i||^2 - 2 y_i.u + ||u||^2 (centred, so without the
    cancellation that large common values would cause)."""
    N = _check(x_ND)
    m_D = median(x_ND)
    y_ND = x_ND - m_D
    yy_N = (y_ND * y_ND).sum(dim=1)
    if tau is None:
        tau = yy_N.sqrt().median().item()
    u_D = torch.zeros_like(m_D)
    if not tau > 0:  # more than half of the inputs equal the median: that value is the answer
        equal_N = (yy_N == 0).float()
        _fill(report, x_ND, m_D, equal_N / equal_N.sum())
        return m_D
    for _ in range(iterations):
        distance_N = (yy_N - 2 * (y_ND @ u_D) + u_D @ u_D).clamp(min=0).sqrt()
        scale_N = (tau / distance_N).clamp(max=1.0)
        step_D = (scale_N @ y_ND - scale_N.sum() * u_D) / N
        u_D = u_D + step_D
        if step_D.norm() <= eps * tau:
            break
    v_D = m_D + u_D
    # at the fixed point v = sum_i s_i x_i / sum_i s_i, s_i the clip scale of input i: s is its weight
    scale_N = (tau / (x_ND - v_D).norm(dim=1)).clamp(max=1.0)
    _fill(report, x_ND, v_D, scale_N / scale_N.sum())
    return v_D


_NETWORK_MAX_N = 32  # up to this many inputs, a sorting network beats torch.sort along the short axis


def _sorted(x_ND: torch.Tensor) -> torch.Tensor:
    """``x_ND`` sorted along N (each coordinate on its own). For few inputs, an odd-even transposition network:
    N rounds of elementwise min/max over whole rows, ~10x faster than ``torch.sort`` over a short strided axis."""
    N = x_ND.shape[0]
    if N > _NETWORK_MAX_N:
        return x_ND.sort(dim=0).values
    rows = list(x_ND.unbind(0))
    for round_ in range(N):
        for i in range(round_ % 2, N - 1, 2):
            rows[i], rows[i + 1] = torch.minimum(rows[i], rows[i + 1]), torch.maximum(rows[i], rows[i + 1])
    return torch.stack(rows)


def _check(x_ND: torch.Tensor) -> int:
    if x_ND.ndim != 2 or x_ND.shape[0] == 0 or not x_ND.is_floating_point():
        raise ValidationError(
            f"aggregators take a float tensor [N inputs, D], got {x_ND.dtype} {tuple(x_ND.shape)}"
        )
    return x_ND.shape[0]


def _fill(report: Report | None, x_ND: torch.Tensor, result_D: torch.Tensor, weights_N: torch.Tensor) -> None:
    if report is not None:
        report.weights_N = weights_N.float()
        report.distances_N = (x_ND - result_D).norm(dim=1).float()


AGGREGATORS = ("centered_clip", "mean", "median", "trimmed_mean", "krum", "geomedian")


def make(
    name: str, *, byzantine: int | None = None, tau: float | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rule ``--aggregator NAME`` names, as a function of ``x_ND``. ``byzantine``: how many inputs the
    trimmed mean trims and Krum leaves out (default: a quarter of the inputs, at most what the rule tolerates);
    ``tau``: CenteredClip's radius (default: the honest spread)."""

    def tolerated(N: int, most: int) -> int:
        return max(0, min(N // 4 if byzantine is None else byzantine, most))

    rules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "mean": mean,
        "median": median,
        "geomedian": geometric_median,
        "centered_clip": partial(centered_clip, tau=tau),
        "trimmed_mean": lambda x_ND: trimmed_mean(x_ND, tolerated(len(x_ND), (len(x_ND) - 1) // 2)),
        # Multi-Krum over the N - f inputs it trusts
        "krum": lambda x_ND: krum(x_ND, f := tolerated(len(x_ND), (len(x_ND) - 3) // 2), m=len(x_ND) - f),
    }
    if name not in rules:
        raise ValidationError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    return rules[name]
