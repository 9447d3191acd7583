r"""The accuracy matrix of a sequence of fine-tuning stages and the figures read from it.

After stages :math:`1..T` trained one after another on tasks :math:`1..T`, :math:`R_{i,j}` is the score on task
:math:`j` after stage :math:`i`, with the row :math:`i = 0` measured before stage 1. Here a matrix is a list of rows
``R[i][j - 1]`` (``i = 0..k``, ``j = 1..T``: the columns are 0-based) that may stop at any row ``k <= T``: every figure
is that of the sequence *as if it ended after stage* ``k``, so it can be logged after each stage, and after the last
one it is the figure of the whole sequence.

With :math:`s = +1` for a higher-is-better metric (accuracy, exact match) and :math:`s = -1` for a lower-is-better one
(loss), so that a negative transfer and a positive forgetting always mean "worse":

- **average accuracy / overall performance** (TRACE's OP; Chaudhry et al. 2018's :math:`A_k`):
  :math:`\mathrm{OP}_k = \frac1k \sum_{j \le k} R_{k,j}`, over the tasks trained so far; :math:`\mathrm{OP}_T` is
  TRACE's :math:`\frac1T \sum_j R_{T,j}`. It is the plain mean (of losses, for a loss);
- **backward transfer** (TRACE; Lopez-Paz & Ranzato 2017, GEM):
  :math:`\mathrm{BWT}_k = \frac1{k-1} \sum_{j<k} s\,(R_{k,j} - R_{j,j})`, for :math:`k \ge 2`; negative = earlier
  tasks got worse after they were learnt;
- **forgetting** of task :math:`j < k` (Avalanche's, from Chaudhry et al. 2018):
  :math:`F_{k,j} = \max_{0 \le i < k} s\,R_{i,j} - s\,R_{k,j}` — the best score it had at any earlier row (the row
  before stage 1 included, as lit_mofo's methods page states it) minus the score now; 0 or more is typical, positive =
  forgotten. The average forgetting is the mean over :math:`j < k`;
- **forward transfer** (Lopez-Paz & Ranzato 2017): :math:`\mathrm{FWT}_k = \frac1{k-1} \sum_{2 \le j \le k}
  s\,(R_{j-1,j} - R_{0,j})` — how much training the earlier stages helped task :math:`j` before its own stage, against
  the model before stage 1; for :math:`k \ge 2`.

A figure that is not defined yet (BWT, FWT and forgetting after stage 1) is ``None``; NaN scores give NaN figures.
Sources: TRACE (Wang et al. 2023, arXiv 2310.06762) for OP and BWT, Avalanche's ``ExperienceForgetting`` /
Chaudhry et al. 2018 (arXiv 1801.10112) for forgetting, GEM (Lopez-Paz & Ranzato 2017, arXiv 1706.08840) for
forward transfer; lit_mofo's ``methods.md`` section 8 states the same formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "Matrix",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "check_matrix",
    "forgetting",
    "forward_transfer",
    "summary",
]

Matrix = Sequence[Sequence[float]]


def check_matrix(matrix: Matrix, after: int | None = None) -> int:
    """Validate ``matrix`` (rows ``0..k`` of ``T`` scores each, ``T >= k``) and return the stage ``k`` the figures are
    for: ``after`` if given (``1 <= after <= k``), else the last row."""
    if not matrix or not all(isinstance(row, Sequence) for row in matrix):
        raise ValueError("An accuracy matrix needs the row before stage 1 and at least one more: [[...], [...]].")
    tasks = len(matrix[0])
    if any(len(row) != tasks for row in matrix):
        raise ValueError(f"Every row of the accuracy matrix must have one score per task ({tasks}); got {matrix!r}.")
    last = len(matrix) - 1
    if last < 1 or tasks < last:
        raise ValueError(
            f"The accuracy matrix has rows 0..{last} and {tasks} task(s): it needs the row before stage 1, one row "
            "per stage trained so far (at least one) and a column for every stage's task."
        )
    if after is None:
        return last
    if not isinstance(after, int) or isinstance(after, bool) or not 1 <= after <= last:
        raise ValueError(f"after={after!r} is not a stage of the matrix; the valid range is 1..{last}.")
    return after


def _sign(higher_is_better: bool) -> float:
    return 1.0 if higher_is_better else -1.0


def average_accuracy(matrix: Matrix, after: int | None = None) -> float:
    """OP after stage ``after`` (default: the last row): the mean score over the tasks trained so far."""
    k = check_matrix(matrix, after)
    return math.fsum(matrix[k][j] for j in range(k)) / k


def backward_transfer(matrix: Matrix, higher_is_better: bool = True, after: int | None = None) -> float | None:
    """BWT after stage ``after``: the mean change of each earlier task since right after its own stage (negative =
    worse); ``None`` after stage 1."""
    k = check_matrix(matrix, after)
    if k < 2:
        return None
    sign = _sign(higher_is_better)
    return math.fsum(sign * (matrix[k][j] - matrix[j + 1][j]) for j in range(k - 1)) / (k - 1)


def forgetting(matrix: Matrix, higher_is_better: bool = True, after: int | None = None) -> list[float | None]:
    """Forgetting of each task after stage ``after``: for task ``j < k`` the best earlier score minus the score now
    (positive = worse); ``None`` for the task just trained and the ones not trained yet."""
    k = check_matrix(matrix, after)
    sign = _sign(higher_is_better)
    out: list[float | None] = []
    for j in range(len(matrix[0])):
        if j + 1 >= k:
            out.append(None)
            continue
        earlier = [sign * matrix[i][j] for i in range(k)]
        best = math.nan if any(math.isnan(v) for v in earlier) else max(earlier)
        out.append(best - sign * matrix[k][j])
    return out


def average_forgetting(matrix: Matrix, higher_is_better: bool = True, after: int | None = None) -> float | None:
    """The mean of :func:`forgetting` over the tasks it is defined for; ``None`` after stage 1."""
    values = [v for v in forgetting(matrix, higher_is_better, after) if v is not None]
    return math.fsum(values) / len(values) if values else None


def forward_transfer(matrix: Matrix, higher_is_better: bool = True, after: int | None = None) -> float | None:
    """FWT after stage ``after``: the mean gain on each task ``j >= 2`` from the stages before it, against the row
    before stage 1; ``None`` after stage 1."""
    k = check_matrix(matrix, after)
    if k < 2:
        return None
    sign = _sign(higher_is_better)
    return math.fsum(sign * (matrix[j - 1][j - 1] - matrix[0][j - 1]) for j in range(2, k + 1)) / (k - 1)


def summary(matrix: Matrix, higher_is_better: bool = True, after: int | None = None) -> dict[str, float | None]:
    """Every figure after stage ``after`` (default: the last row): ``op``, ``bwt``, ``fwt`` and
    ``average_forgetting``."""
    return {
        "op": average_accuracy(matrix, after),
        "bwt": backward_transfer(matrix, higher_is_better, after),
        "fwt": forward_transfer(matrix, higher_is_better, after),
        "average_forgetting": average_forgetting(matrix, higher_is_better, after),
    }
