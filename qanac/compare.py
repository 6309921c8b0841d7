"""Numerical comparison of a compiled model against its float reference.

Metrics per output: top-1 agreement (for outputs with a class axis), max and mean absolute error, and
SQNR in dB (10 log10 of signal power over error power). Thresholds are explicit and printed with the
smallest value that would have passed, so a failure says how far off it was.

``compare_outputs`` is the only place qanac computes how two models' outputs differ: ``qanac verify``,
the pipeline's per-pass check (``max_abs_difference``, ``max_exact_violation``), the Akida agreement check
and the onnxruntime fused-kernel check all go through it.

Default thresholds for ``qanac verify`` (docs/cli.md):
    top-1 agreement   >= 0.95 (quantized models; fewer than 1 in 20 predictions may flip)
    SQNR              >= 15 dB
Exact checks (``--verify-each`` on exact passes) use ``exact_tolerance``: max abs error
<= 1e-4 * (1 + max |reference|).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Thresholds:
    min_top1_agreement: float = 0.95
    min_sqnr_db: float = 15.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    mean_abs_error: float
    sqnr_db: float
    top1_agreement: float | None  # None when the output has no class axis

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        return data


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    noise = np.mean((reference - actual.astype(np.float64)) ** 2)
    signal = np.mean(reference**2)
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def top1_agreement(reference: np.ndarray, actual: np.ndarray) -> float | None:
    """Share of samples whose argmax over the class axis agrees; None for outputs without one."""

    if reference.ndim < 2:
        return None
    flat_ref = reference.reshape(len(reference), -1)
    flat_act = actual.reshape(len(actual), -1)
    if flat_ref.shape[1] < 2:
        return None
    return float(np.mean(np.argmax(flat_ref, axis=1) == np.argmax(flat_act, axis=1)))


def compare_outputs(names: list[str], reference: list[np.ndarray], actual: list[np.ndarray]) -> list[OutputComparison]:
    """The one output comparison of qanac: per output, ``actual`` (reshaped to the reference's shape) against
    ``reference`` in float64. An output whose size differs from its reference raises ValueError."""

    results = []
    for name, ref, act in zip(names, reference, actual, strict=False):
        if ref.size != act.size:
            raise ValueError(f"output '{name}': reference has shape {ref.shape}, compiled has {act.shape}")
        act = act.reshape(ref.shape)
        err = np.abs(ref.astype(np.float64) - act.astype(np.float64))
        results.append(
            OutputComparison(
                name=name,
                shape=tuple(ref.shape),
                max_abs_error=float(err.max()) if err.size else 0.0,
                mean_abs_error=float(err.mean()) if err.size else 0.0,
                sqnr_db=sqnr_db(ref, act),
                top1_agreement=top1_agreement(ref, act),
            )
        )
    return results


def max_abs_difference(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """The largest absolute difference over all outputs (``compare_outputs``); inf when a size differs."""

    try:
        results = compare_outputs([str(i) for i in range(len(reference))], reference, actual)
    except ValueError:
        return float("inf")
    return max((r.max_abs_error for r in results), default=0.0)


def failures(results: list[OutputComparison], thresholds: Thresholds) -> list[str]:
    """Human sentences for every threshold broken, each naming the value that would have passed."""

    problems = []
    for r in results:
        if r.top1_agreement is not None and r.top1_agreement < thresholds.min_top1_agreement:
            problems.append(
                f"output '{r.name}': top-1 agreement {r.top1_agreement:.4f} < {thresholds.min_top1_agreement} "
                f"(--min-agreement {r.top1_agreement:.4f} would pass)"
            )
        if r.sqnr_db < thresholds.min_sqnr_db:
            problems.append(
                f"output '{r.name}': SQNR {r.sqnr_db:.2f} dB < {thresholds.min_sqnr_db} dB "
                f"(--min-sqnr {np.floor(r.sqnr_db * 100) / 100:.2f} would pass)"
            )
    return problems


def exact_tolerance(reference: np.ndarray) -> float:
    """Allowed max abs error for a rewrite that is exact up to float rounding."""

    return 1e-4 * (1.0 + float(np.max(np.abs(reference))) if reference.size else 1.0)


def max_exact_violation(reference: list[np.ndarray], actual: list[np.ndarray]) -> tuple[float, float] | None:
    """The worst (error, tolerance) pair if any output breaks the exact tolerance, else None; an output whose
    shape changed breaks it with an infinite error."""

    worst = None
    for ref, act in zip(reference, actual, strict=False):
        tol = exact_tolerance(ref)
        err = max_abs_difference([ref], [act]) if ref.shape == act.shape else float("inf")
        if err > tol and (worst is None or err / tol > worst[0] / worst[1]):
            worst = (err, tol)
    return worst
