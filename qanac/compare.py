"""Numerical comparison of a compiled model against its float reference, chosen per output.

Each output is compared according to what it is, read from its shape (``output_kind``):

    classification  one axis besides the batch with two or more entries (logits, probabilities): top-1
                    agreement, SQNR, errors, and margin-aware statistics (below)
    dense           two or more such axes (a detection grid N x H x W x C, a segmentation map, a feature map):
                    SQNR, errors and per-cell argmax agreement over the class axis; top-1 over the whole
                    grid means nothing, so it is neither computed nor gated
    value           one number per sample (a regression, a score): SQNR and errors

The class axis of a dense output is its channel axis: for rank 4, the last axis when axes 1 and 2 are the
equal pair of a square grid (N x H x W x C), else axis 1 (N x C x H x W, the ONNX convention); for rank 3 the
smaller of the two (N x cells x C, or N x C x length); for higher ranks the last.

Margin-aware statistics: the float margin of a sample (or cell) is its top-1 minus its top-2 value along the
class axis. A sample is a near tie when that margin is at most the noise scale, twice the RMS error of the
compared output: quantization noise of that size can flip its argmax, so its agreement is chance, not
evidence. ``near_tie_share`` is the share of such samples, ``decisive_agreement`` the agreement over the
others.

``compare_outputs`` is the only place qanac computes how two models' outputs differ: ``qanac verify``,
the pipeline's per-pass check (``max_abs_difference``, ``max_exact_violation``), the Akida agreement check
and the onnxruntime fused-kernel check all go through it. Thresholds are explicit and ``failures`` names,
for each broken one, the value that would have passed.

Default thresholds for ``qanac verify`` (docs/cli.md):
    top-1 agreement   >= 0.95 (classification outputs; fewer than 1 in 20 predictions may flip)
    SQNR              >= 15 dB (every output)
Exact checks (``--verify-each`` on exact passes) use ``exact_tolerance``: max abs error
<= 1e-4 * (1 + max |reference|).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CLASSIFICATION = "classification"
DENSE = "dense"
VALUE = "value"
KINDS = (CLASSIFICATION, DENSE, VALUE)


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
    top1_agreement: float | None  # classification outputs only
    kind: str = VALUE  # CLASSIFICATION, DENSE or VALUE (``output_kind``)
    class_axis: int | None = None  # the axis argmax runs over (classification and dense)
    cell_agreement: float | None = None  # dense outputs: share of cells whose argmax agrees
    near_tie_share: float | None = None  # share of samples (cells) whose float margin is within the noise
    decisive_agreement: float | None = None  # agreement over the samples (cells) that are not near ties

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shape"] = list(self.shape)
        return data

    def describe(self) -> str:
        """One line: the metrics of this output's kind."""

        parts = []
        if self.kind == CLASSIFICATION and self.top1_agreement is not None:
            parts.append(f"top-1 agreement {self.top1_agreement:.4f}")
        if self.kind == DENSE and self.cell_agreement is not None:
            parts.append(f"per-cell argmax agreement {self.cell_agreement:.4f} (axis {self.class_axis})")
        if self.near_tie_share is not None:
            decisive = "n/a" if self.decisive_agreement is None else f"{self.decisive_agreement:.4f}"
            parts.append(f"near ties {self.near_tie_share:.1%}, decisive agreement {decisive}")
        parts.append(f"max abs err {self.max_abs_error:.4g}, mean abs err {self.mean_abs_error:.4g}, "
                     f"SQNR {self.sqnr_db:.2f} dB")
        return f"{self.kind}: " + ", ".join(parts)


def output_kind(shape: tuple[int, ...]) -> tuple[str, int | None]:
    """(kind, class axis) of an output of ``shape`` (batch first), by the rules of this module's docstring."""

    axes = [axis for axis in range(1, len(shape)) if shape[axis] > 1]
    if not axes:
        return VALUE, None
    if len(axes) == 1:
        return CLASSIFICATION, axes[0]
    rank = len(shape)
    if rank == 3:
        return DENSE, 1 if shape[1] <= shape[2] else 2
    if rank == 4:
        square_nhwc = shape[1] == shape[2] and shape[2] != shape[3]
        return DENSE, 3 if square_nhwc else 1
    return DENSE, rank - 1


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
    """Share of samples whose argmax over all values of the sample agrees; None for outputs with fewer than
    two values per sample."""

    if reference.ndim < 2:
        return None
    flat_ref = reference.reshape(len(reference), -1)
    flat_act = actual.reshape(len(actual), -1)
    if flat_ref.shape[1] < 2:
        return None
    return float(np.mean(np.argmax(flat_ref, axis=1) == np.argmax(flat_act, axis=1)))


def float_margins(reference: np.ndarray, axis: int) -> np.ndarray:
    """Top-1 minus top-2 value along ``axis``, per sample (cell), in float64."""

    values = np.moveaxis(reference.astype(np.float64), axis, -1)
    count = values.shape[-1]
    top2 = np.partition(values, (count - 2, count - 1), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def compare_one(name: str, reference: np.ndarray, actual: np.ndarray, kind: str | None = None) -> OutputComparison:
    """``actual`` (reshaped to the reference's shape) against ``reference`` in float64, by the metrics of the
    output's kind (``output_kind`` unless given)."""

    actual = actual.reshape(reference.shape)
    ref64, act64 = reference.astype(np.float64), actual.astype(np.float64)
    err = np.abs(ref64 - act64)
    chosen, axis = output_kind(tuple(reference.shape))
    if kind is not None and kind != chosen:  # the caller knows better: a value has no class axis, else the last
        chosen = kind
        axis = None if kind == VALUE else (axis if axis is not None else reference.ndim - 1)
    result = OutputComparison(
        name=name,
        shape=tuple(reference.shape),
        max_abs_error=float(err.max()) if err.size else 0.0,
        mean_abs_error=float(err.mean()) if err.size else 0.0,
        sqnr_db=sqnr_db(reference, actual),
        top1_agreement=None,
        kind=chosen,
    )
    if axis is None or not reference.size or reference.shape[axis] < 2:
        return dataclasses.replace(result, kind=VALUE)
    agrees = np.argmax(ref64, axis=axis) == np.argmax(act64, axis=axis)
    noise = 2.0 * float(np.sqrt(np.mean(err**2)))
    tied = float_margins(ref64, axis) <= noise
    decisive = agrees[~tied]
    result = dataclasses.replace(
        result,
        class_axis=axis,
        near_tie_share=float(np.mean(tied)),
        decisive_agreement=float(np.mean(decisive)) if decisive.size else None,
    )
    if chosen == CLASSIFICATION:
        return dataclasses.replace(result, top1_agreement=float(np.mean(agrees)))
    return dataclasses.replace(result, cell_agreement=float(np.mean(agrees)))


def compare_outputs(names: list[str], reference: list[np.ndarray], actual: list[np.ndarray],
                    kinds: dict[str, str] | None = None) -> list[OutputComparison]:
    """The one output comparison of qanac: per output, ``compare_one`` with the kind ``kinds`` gives it (by
    output name), else the kind its shape says. An output whose size differs from its reference raises
    ValueError."""

    results = []
    for name, ref, act in zip(names, reference, actual, strict=False):
        if ref.size != act.size:
            raise ValueError(f"output '{name}': reference has shape {ref.shape}, compiled has {act.shape}")
        results.append(compare_one(name, ref, act, (kinds or {}).get(name)))
    return results


def max_abs_difference(reference: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """The largest absolute difference over all outputs (``compare_outputs``); inf when a size differs."""

    try:
        results = compare_outputs([str(i) for i in range(len(reference))], reference, actual)
    except ValueError:
        return float("inf")
    return max((r.max_abs_error for r in results), default=0.0)


def failures(results: list[OutputComparison], thresholds: Thresholds) -> list[str]:
    """Human sentences for every threshold broken, each naming the value that would have passed. Top-1
    agreement is gated on classification outputs, SQNR on every output."""

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
                f"(--min-sqnr {passing_sqnr(r.sqnr_db):.2f} would pass)"
            )
    return problems


def passing_sqnr(value: float) -> float:
    """The SQNR threshold, in hundredths of a dB, that ``value`` meets."""

    return float(np.floor(value * 100) / 100)


def passing_thresholds(results: list[OutputComparison]) -> dict[str, float | None]:
    """The strictest thresholds ``results`` would meet: the lowest gated top-1 agreement (None when no output
    is gated on it) and the lowest SQNR, rounded down to hundredths of a dB (None when every output is
    exact)."""

    agreements = [r.top1_agreement for r in results if r.top1_agreement is not None]
    sqnrs = [r.sqnr_db for r in results if r.sqnr_db != float("inf")]
    return {
        "min_top1_agreement": min(agreements) if agreements else None,
        "min_sqnr_db": passing_sqnr(min(sqnrs)) if sqnrs else None,
    }


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
