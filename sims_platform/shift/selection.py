"""Distribution shifting: the aux set whose SIMS guidance moves the class histogram to a target.

Per class c, guidance with weight w tilts the base's class probabilities away from the aux model's,

    pi_guided(c) ∝ pi_base(c)^(1+w) pi_aux(c)^(-w),

so the aux histogram that makes pi_guided equal the target t is (solve for pi_aux, normalise)

    pi_aux(c) ∝ (pi_base(c)^(1+w) / t(c))^(1/w).

Calibration. The formula is exact for a sampler of the tilted density and an aux model that learned its set's
histogram exactly. Neither holds: an aux fine-tuned for a budget B moves only part of the way from the base
toward its set, pi_aux_model ∝ pi_base^(1-l) pi_set^l, and substituting gives the same form with w replaced by
l w; guidance on the denoiser (not on the density) shrinks or stretches the tilt in the same way, to first
order. So one number, the gain g (effective weight g w), calibrates the design: `fit_gain` estimates it from a
measured guided histogram (least squares on centred log ratios), and `aux_histogram(..., gain=g)` designs the
next aux set for it. gain = 1 is the uncalibrated formula.

Everything here is float64 and pure (no I/O), so each function is tested on a known histogram.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Normalised histograms are compared with this tolerance (float64 sums of a few classes).
SUM_TOLERANCE = 1e-6


class ShiftError(ValueError):
    """The target cannot be reached from this base (permanent: the inputs must change)."""


def class_probabilities(p: Tensor | list[float], name: str) -> Tensor:
    """p as a float64 vector of non-negative entries summing to 1."""
    q = torch.as_tensor(p, dtype=torch.float64).flatten()
    if q.numel() == 0 or not torch.isfinite(q).all() or (q < 0).any():
        raise ShiftError(f"{name}: expected finite non-negative class probabilities, got {q.tolist()}")
    if abs(float(q.sum()) - 1) > SUM_TOLERANCE:
        raise ShiftError(f"{name}: class probabilities sum to {float(q.sum()):.6g}, expected 1")
    return q


def class_histogram(labels: Tensor, num_classes: int) -> Tensor:
    """Normalised histogram (float64 [num_classes]) of integer labels in 0..num_classes-1."""
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if labels.numel() == 0:
        raise ShiftError("class_histogram: no labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ShiftError(f"class_histogram: labels span {int(labels.min())}..{int(labels.max())}, expected "
                         f"0..{num_classes - 1}")
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return counts / counts.sum()


def total_variation(p: Tensor | list[float], q: Tensor | list[float]) -> float:
    """Total-variation distance 1/2 sum |p - q| between two class histograms (0 = equal, 1 = disjoint)."""
    a, b = class_probabilities(p, "total_variation p"), class_probabilities(q, "total_variation q")
    if a.shape != b.shape:
        raise ShiftError(f"total_variation: histograms over {a.numel()} and {b.numel()} classes")
    return float((a - b).abs().sum() / 2)


# ----------------------------------------------------------------------------
# The guidance model and its inverse


def guided_histogram(base: Tensor | list[float], aux: Tensor | list[float], w: float) -> Tensor:
    """The model's guided histogram: pi_base^(1+w) pi_aux^(-w), normalised (classes the base lacks stay 0)."""
    b, a = class_probabilities(base, "base histogram"), class_probabilities(aux, "aux histogram")
    if w < 0:
        raise ShiftError(f"guided_histogram: w must be >= 0, got {w}")
    present = b > 0
    if (present & (a == 0)).any():
        missing = torch.nonzero(present & (a == 0)).flatten().tolist()
        raise ShiftError(f"guided_histogram: aux has no mass on classes {missing} that the base produces "
                         "(negative guidance would send them to infinity)")
    logits = torch.full_like(b, -torch.inf)
    logits[present] = (1 + w) * b[present].log() - w * a[present].log()
    return torch.softmax(logits, dim=0)


def aux_histogram(base: Tensor | list[float], target: Tensor | list[float], w: float, gain: float = 1.0) -> Tensor:
    """The aux histogram whose guidance at w turns the base's histogram into the target (see the module doc).

    gain: the calibrated effective-weight factor (the tilt acts as weight gain * w); 1 = the ideal formula.
    """
    b, t = class_probabilities(base, "base histogram"), class_probabilities(target, "target")
    if b.shape != t.shape:
        raise ShiftError(f"aux_histogram: base over {b.numel()} classes, target over {t.numel()}")
    if w <= 0 or gain <= 0:
        raise ShiftError(f"aux_histogram: w and gain must be > 0 (w = 0 is the base, which cannot shift), got "
                         f"w={w}, gain={gain}")
    if (t == 0).any():
        zero = torch.nonzero(t == 0).flatten().tolist()
        raise ShiftError(f"aux_histogram: target is 0 on classes {zero}; guidance with a finite w only reweights, "
                         "so every target class needs a probability > 0")
    absent = torch.nonzero(b == 0).flatten().tolist()
    if absent:
        raise ShiftError(f"aux_histogram: the base produced no samples of classes {absent}, which the target "
                         "asks for; negative guidance reweights what the base produces and cannot create a class "
                         "(more synthetic samples, or a base trained on that class, are needed)")
    ew = gain * w
    return torch.softmax(((1 + ew) * b.log() - t.log()) / ew, dim=0)


def fit_gain(base: Tensor | list[float], aux: Tensor | list[float], guided: Tensor | list[float],
             w: float) -> float:
    """The gain g for which pi_base^(1+g w) pi_aux^(-g w) best fits a measured guided histogram.

    log(pi_guided / pi_base) = g w log(pi_base / pi_aux) + const: least squares through the class-centred log
    ratios, over the classes where all three histograms are positive (at least two with distinct x needed).
    """
    b, a = class_probabilities(base, "base histogram"), class_probabilities(aux, "aux histogram")
    g = class_probabilities(guided, "guided histogram")
    if not b.shape == a.shape == g.shape:
        raise ShiftError("fit_gain: histograms over different numbers of classes")
    if w <= 0:
        raise ShiftError(f"fit_gain: w must be > 0, got {w}")
    ok = (b > 0) & (a > 0) & (g > 0)
    x = w * (b[ok].log() - a[ok].log())
    y = g[ok].log() - b[ok].log()
    x, y = x - x.mean(), y - y.mean()
    denom = float((x * x).sum())
    if int(ok.sum()) < 2 or denom <= 0:
        raise ShiftError("fit_gain: the aux histogram equals the base's on the classes measured (no tilt to fit)")
    return float((x * y).sum()) / denom


# ----------------------------------------------------------------------------
# The stratified resample


def stratified_counts(probs: Tensor | list[float], total: int) -> list[int]:
    """Per-class counts summing exactly to total, proportional to probs (largest-remainder rounding; ties go to
    the lower class index)."""
    p = class_probabilities(probs, "stratified_counts probs")
    if total < 0:
        raise ShiftError(f"stratified_counts: total must be >= 0, got {total}")
    exact = p * total
    counts = exact.floor().to(torch.int64)
    short = total - int(counts.sum())
    remainder = (exact - counts).tolist()
    order = sorted(range(len(remainder)), key=lambda c: (-remainder[c], c))
    for c in order[:short]:
        counts[c] += 1
    return counts.tolist()


def stratified_indices(labels: Tensor, counts: list[int], seed: int) -> tuple[Tensor, int]:
    """Indices into labels holding counts[c] samples of each class c, and how many are repeats.

    Without replacement while a class has enough samples (a seeded permutation); a class with fewer samples than
    asked contributes each sample once and draws the rest with replacement. Deterministic given seed; sorted.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    gen = torch.Generator().manual_seed(seed)
    picked, repeats = [], 0
    for c, k in enumerate(counts):
        if k < 0:
            raise ShiftError(f"stratified_indices: class {c} has a negative count {k}")
        pool = torch.nonzero(labels == c).flatten()
        if k and not len(pool):
            raise ShiftError(f"stratified_indices: {k} samples of class {c} asked for, but the set has none")
        perm = pool[torch.randperm(len(pool), generator=gen)]
        if k <= len(pool):
            picked.append(perm[:k])
        else:
            extra = perm[torch.randint(len(pool), (k - len(pool),), generator=gen)]
            picked += [perm, extra]
            repeats += k - len(pool)
    idx = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)
    return idx.sort().values, repeats
