"""Continual-learning metrics computed from the result matrix ``R``.

Conventions
-----------
``R`` is a ``(T, T)`` float array. Row ``i`` holds the evaluations made *after training task i*;
column ``j`` is the *evaluated task j*; so ``R[i, j]`` is the performance on task ``j`` after
learning tasks ``0..i``. The diagonal ``R[j, j]`` is task ``j`` right after it was learned, entries
above it (``j > i``) are zero-shot evaluations of tasks not yet trained on, entries below it
(``j < i``) measure retention. All indices below are 0-based.

A run fills rows in task order, one full row per task; rows not yet filled are all NaN. If ``L`` is
the index of the last filled row, every metric is computed for the prefix of ``K = L + 1`` learned
tasks as if the sequence ended there (so a partial run reports "the metrics so far"). A metric that
needs more rows than there are (e.g. BWT after one task) is ``None``.

Loss matrices (``higher_is_better=False``)
------------------------------------------
Metrics are computed on ``P = -R`` (``baseline`` and ``within_task`` are negated too), so that
every *difference* metric keeps one meaning whatever is measured:

* ``bwt``, ``fwt``: positive = good (transfer), negative ``bwt`` = forgetting;
* ``forgetting``, ``max_forgetting``, ``libero_nbt``, ``libero_nbt_code``: positive = bad (performance
  was lost).

*Level* metrics (``acc``, ``acc_all``, ``learning_accuracy``, ``libero_fwt``, ``libero_auc``) are
averages of entries of ``R``; they are mapped back (``-mean(P) = mean(R)``) and so stay in the units
of ``R`` -- for a loss matrix ``acc`` is the mean loss, and lower is still better. "Best" inside a
formula (the max in forgetting, LIBERO's best checkpoint) is taken on ``P``, i.e. the lowest loss.

Definitions (with ``L`` the last filled row, ``P`` as above)
-------------------------------------------------------------
``acc``
    Average performance after the last learned task over the tasks seen so far
    (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", ACC; Chaudhry et al. 2018, A_k):
    ``acc = 1/(L+1) * sum_{j=0}^{L} R[L, j]``.
``acc_all``
    The same row averaged over all ``T`` tasks, unseen ones included:
    ``acc_all = 1/T * sum_{j=0}^{T-1} R[L, j]`` (equals ``acc`` once the run is complete).
``learning_accuracy``
    Mean performance on each task right after learning it (Riemer et al. 2019, LA):
    ``1/(L+1) * sum_{j=0}^{L} R[j, j]``.
``bwt``
    Backward transfer (Lopez-Paz & Ranzato 2017):
    ``bwt = 1/L * sum_{j=0}^{L-1} (P[L, j] - P[j, j])``; ``None`` when ``L < 1``.
``fwt``
    Forward transfer (Lopez-Paz & Ranzato 2017), against ``b = baseline``, the performance of the
    initial (untrained on the sequence) model on each task:
    ``fwt = 1/(T-1) * sum_{j=1}^{T-1} (P[j-1, j] - b_j)`` with ``b`` negated for losses. For a partial
    run the sum runs over the defined terms ``j = 1..min(L+1, T-1)``. ``None`` without a baseline.
``forgetting``, ``forgetting_per_task``, ``max_forgetting``
    Chaudhry et al. 2018 ("Riemannian Walk for Incremental Learning"), for ``j < L``:
    ``f_j = max_{l in [j, L-1]} P[l, j] - P[L, j]``; ``forgetting = mean_j f_j``,
    ``max_forgetting = max_j f_j``. The original takes the max over all ``l <= L-1``; we start at
    ``l = j`` because rows before task ``j`` was learned are zero-shot scores, not knowledge that
    could be forgotten. ``forgetting_per_task`` has length ``T`` and is ``None`` for ``j >= L``.
``libero_fwt``, ``libero_nbt``, ``libero_auc``
    LIBERO (Liu et al. 2023, "LIBERO: Benchmarking Knowledge Transfer for Lifelong Robot Learning",
    Sec. 5), written for success rates; here in 0-based form over the ``K = L + 1`` learned tasks.
    ``c_{k,k,e}`` is the performance on task ``k`` at the ``e``-th evaluation during task ``k``'s own
    training (``within_task[k]``, the last point at its end); ``c_{k,k} = max_e c_{k,k,e}`` (LIBERO
    keeps the best checkpoint); ``c_{tau,k} = P[tau, k]`` for ``tau > k``. Without ``within_task``
    we use the single point ``[P[k, k]]``, so ``FWT_k = c_{k,k} = P[k, k]``.

    * ``FWT_k = mean_e c_{k,k,e}``;  ``libero_fwt = 1/K * sum_{k=0}^{K-1} FWT_k``.
    * ``NBT_k = 1/(K-k-1) * sum_{tau=k+1}^{K-1} (c_{k,k} - c_{tau,k})`` for ``k < K-1`` (undefined
      for the last task, whose sum is empty); ``libero_nbt`` is the mean over ``k = 0..K-2``
      (``None`` when ``K < 2``).
    * ``AUC_k = 1/(K-k) * (FWT_k + sum_{tau=k+1}^{K-1} c_{tau,k})``;
      ``libero_auc = 1/K * sum_{k=0}^{K-1} AUC_k``.

    (The paper's 1-based forms are ``NBT_k = 1/(K-k) sum_{tau=k+1}^{K}`` and ``AUC_k = 1/(K-k+1)
    (FWT_k + sum_{tau=k+1}^{K})``.) If the run keeps the *last* rather than the best within-task
    weights (the default; ``eval.keep_best_within_task=true`` keeps the best, as LIBERO does),
    ``libero_nbt`` also counts the drop from the best to the final within-task point.
``libero_fwt_code``, ``libero_nbt_code``, ``libero_auc_code``
    The same as LIBERO's code computes them: ``learn_one_task`` (``libero/lifelong/algos/base.py``,
    148-254) for each task's curve and ``compute_metric`` (``notebooks/quick_guide_algo.ipynb``, Sec. 5.2)
    for the sums. The curve of task ``k`` starts with a zero-shot evaluation before any training on it
    (the loop records it as ``within_task[k][0]`` when ``eval.within_task_evals > 0``), and every point
    from the first best one on is replaced by the best (LIBERO "pretends that the agent stops learning
    once it reaches the peak"): with ``e* = argmax_e c_{k,k,e}`` (first),
    ``FWT^code_k = 1/n * (sum_{e<e*} c_{k,k,e} + (n - e*) c_{k,k})``, ``n`` the number of points; this is
    LIBERO's ``S_fwd[k]``. ``AUC^code_k`` is ``AUC_k`` with ``FWT^code_k``.

    ``NBT^code`` differs from the paper's ``NBT`` twice: ``compute_metric`` takes ``c_{k,k}`` from the
    success matrix's diagonal, ``P[k, k]`` (in LIBERO the evaluation of the best checkpoint, reloaded at
    the task's end: ``eval.keep_best_within_task=true`` here), not the curve's maximum, and it gives the
    last task a term of 0 and divides by ``K``:
    ``libero_nbt_code = 1/K * sum_{k=0}^{K-2} 1/(K-k-1) * sum_{tau=k+1}^{K-1} (P[k, k] - P[tau, k])``,
    i.e. ``(K-1)/K`` times the mean over the other tasks. ``None`` when ``K < 2`` (LIBERO's code would
    print 0 there: nothing can have been forgotten yet). The FWT conventions agree when every curve peaks
    at its last point and differ most for curves that peak early: on uniform random 10-task runs with
    LIBERO's 11-point curves, ``libero_fwt_code - libero_fwt`` is 0.21 on average and up to 0.38. The NBT
    conventions differ on almost every run, even without within-task curves (the factor ``(K-1)/K``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

MetricValue = float | int | bool | None | list[float | None]

#: Scalar metrics, in the order they are displayed.
SCALAR_METRICS: tuple[str, ...] = (
    "acc",
    "acc_all",
    "learning_accuracy",
    "bwt",
    "fwt",
    "forgetting",
    "max_forgetting",
    "libero_fwt",
    "libero_nbt",
    "libero_auc",
    "libero_fwt_code",
    "libero_nbt_code",
    "libero_auc_code",
)

#: Metrics that are averages of entries of R, reported in R's own units (see module docstring).
LEVEL_METRICS: frozenset[str] = frozenset(
    {"acc", "acc_all", "learning_accuracy", "libero_fwt", "libero_auc", "libero_fwt_code", "libero_auc_code"}
)


def validate_matrix(R: ArrayLike) -> np.ndarray:
    """Check ``R`` and return it as a new float64 array.

    ``R`` must be square and non-empty; each row is either entirely NaN (not yet filled), entirely
    finite, or finite up to its own task and NaN after it (``eval.evaluate_unseen=false``: tasks not
    trained yet are not evaluated), and filled rows form a prefix (rows are filled in task order).
    ``None`` entries (as in JSON) are read as NaN. Raises ``ValueError`` otherwise.
    """
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"R must be a numeric (T, T) array, but it could not be read as floats ({exc})."
        ) from exc
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"R must be a square (T, T) matrix, but it has shape {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError("R must hold at least one task, but it is empty.")
    inf = np.argwhere(np.isinf(arr))
    if len(inf):
        i, j = inf[0]
        raise ValueError(f"R[{i}, {j}] is infinite; evaluations must be finite numbers.")
    nan = np.isnan(arr)
    filled = ~nan.all(axis=1)
    for i in np.flatnonzero(filled):
        if nan[i, : i + 1].any():
            cols = np.flatnonzero(nan[i]).tolist()
            raise ValueError(
                f"Row {i} of R is only partly filled (NaN in columns {cols}); every task learned so "
                f"far must be evaluated after each task."
            )
    n_filled = int(filled.sum())
    if n_filled and not filled[:n_filled].all():
        gap = int(np.flatnonzero(~filled)[0])
        later = int(np.flatnonzero(filled)[-1])
        raise ValueError(
            f"Row {later} of R is filled but row {gap} is not; rows must be filled in task order."
        )
    return arr


def last_filled_row(R: ArrayLike) -> int:
    """Index of the last filled row of a valid ``R``, or ``-1`` if no task has been learned yet."""
    arr = validate_matrix(R)
    filled = np.flatnonzero(~np.isnan(arr).all(axis=1))
    return int(filled[-1]) if len(filled) else -1


def _validate_baseline(baseline: ArrayLike, num_tasks: int) -> np.ndarray:
    try:
        b = np.array(baseline, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"baseline must be a numeric vector, but it could not be read as floats ({exc})."
        ) from exc
    if b.shape != (num_tasks,):
        raise ValueError(f"baseline must have shape ({num_tasks},) to match R, but it has shape {b.shape}.")
    if not np.isfinite(b).all():
        raise ValueError("baseline must hold only finite numbers.")
    return b


def _validate_within_task(
    within_task: Sequence[ArrayLike | None], num_tasks: int, last: int
) -> list[np.ndarray]:
    if isinstance(within_task, str | bytes) or len(within_task) != num_tasks:
        raise ValueError(f"within_task must be a sequence of {num_tasks} per-task lists, one for each task.")
    points = []
    for k in range(last + 1):
        entry = within_task[k]
        try:
            w = np.array([] if entry is None else entry, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"within_task[{k}] must be a list of numbers ({exc}).") from exc
        if w.ndim != 1 or w.size == 0:
            raise ValueError(
                f"within_task[{k}] must be a non-empty list of numbers because task {k} was learned."
            )
        if not np.isfinite(w).all():
            raise ValueError(f"within_task[{k}] must hold only finite numbers.")
        points.append(w)
    return points


def _stopped_at_best(curve: np.ndarray) -> np.ndarray:
    """LIBERO's ``learn_one_task``: every point from the first best one on becomes the best."""
    out = curve.copy()
    best = int(np.argmax(curve))  # the first maximum, as LIBERO's strict ``prev < success`` test keeps
    out[best:] = curve[best]
    return out


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


@dataclass(frozen=True)
class CLMetrics:
    """The metrics of one result matrix; see the module docstring for every formula.

    ``tasks_learned`` is ``L + 1`` (the number of filled rows). Undefined metrics are ``None``.
    """

    num_tasks: int
    tasks_learned: int
    higher_is_better: bool
    acc: float | None = None
    acc_all: float | None = None
    learning_accuracy: float | None = None
    bwt: float | None = None
    fwt: float | None = None
    forgetting: float | None = None
    max_forgetting: float | None = None
    libero_fwt: float | None = None
    libero_nbt: float | None = None
    libero_auc: float | None = None
    libero_fwt_code: float | None = None
    libero_nbt_code: float | None = None
    libero_auc_code: float | None = None
    forgetting_per_task: tuple[float | None, ...] = ()

    @classmethod
    def from_matrix(
        cls,
        R: ArrayLike,
        *,
        higher_is_better: bool = True,
        baseline: ArrayLike | None = None,
        within_task: Sequence[ArrayLike | None] | None = None,
    ) -> CLMetrics:
        """Compute every metric of ``R`` (see :func:`compute_metrics`)."""
        arr = validate_matrix(R)
        T = arr.shape[0]
        rows = np.flatnonzero(~np.isnan(arr).all(axis=1))
        L = int(rows[-1]) if len(rows) else -1
        b = None if baseline is None else _validate_baseline(baseline, T)
        w = None if within_task is None else _validate_within_task(within_task, T, L)
        if L < 0:
            return cls(T, 0, higher_is_better, forgetting_per_task=(None,) * T)

        # One sign so that "bigger P is better" holds for both success rates and losses.
        s = 1.0 if higher_is_better else -1.0
        P = s * arr

        def level(x: float) -> float:
            # Back to R's units; "+ 0.0" turns the -0.0 of a negated zero into 0.0 for tidy JSON.
            return float(s * x) + 0.0

        K = L + 1
        diag = np.diag(P)[:K]

        bwt = _mean(P[L, :L] - diag[:L]) if L >= 1 else None

        fwt = None
        if b is not None:
            js = np.arange(1, min(L + 1, T - 1) + 1)
            fwt = _mean(P[js - 1, js] - s * b[js])
            fwt = fwt if fwt is not None and np.isfinite(fwt) else None  # unseen tasks not evaluated

        per_task: list[float | None] = [None] * T
        for j in range(L):
            per_task[j] = float(P[j:L, j].max() - P[L, j])
        defined = [f for f in per_task if f is not None]

        within = [np.array([P[k, k]]) for k in range(K)] if w is None else [s * wk for wk in w]
        fwt_k = np.array([wk.mean() for wk in within])
        best_k = np.array([wk.max() for wk in within])
        nbt_k = [float(np.mean(best_k[k] - P[k + 1 : K, k])) for k in range(K - 1)]
        # LIBERO's compute_metric: c_kk from the diagonal, the last task's term 0, divided by K.
        nbt_code_k = [float(np.mean(diag[k] - P[k + 1 : K, k])) for k in range(K - 1)]
        auc_k = [(fwt_k[k] + P[k + 1 : K, k].sum()) / (K - k) for k in range(K)]
        code_k = np.array([_stopped_at_best(wk).mean() for wk in within])
        auc_code_k = [(code_k[k] + P[k + 1 : K, k].sum()) / (K - k) for k in range(K)]

        return cls(
            num_tasks=T,
            tasks_learned=K,
            higher_is_better=higher_is_better,
            acc=level(P[L, :K].mean()),
            acc_all=level(P[L].mean()) if np.isfinite(P[L]).all() else None,
            learning_accuracy=level(diag.mean()),
            bwt=bwt,
            fwt=fwt,
            forgetting=_mean(defined),
            max_forgetting=float(max(defined)) if defined else None,
            libero_fwt=level(fwt_k.mean()),
            libero_nbt=_mean(nbt_k),
            libero_auc=level(np.mean(auc_k)),
            libero_fwt_code=level(code_k.mean()),
            libero_nbt_code=float(np.sum(nbt_code_k)) / K if K >= 2 else None,
            libero_auc_code=level(np.mean(auc_code_k)),
            forgetting_per_task=tuple(per_task),
        )

    def to_dict(self) -> dict[str, MetricValue]:
        """Plain, JSON-ready dict (``forgetting_per_task`` as a list, ``None`` for undefined)."""
        out = asdict(self)
        out["forgetting_per_task"] = list(self.forgetting_per_task)
        return out

    def scalars(self) -> dict[str, float]:
        """Only the defined scalar metrics, e.g. for a logger that rejects ``None``."""
        return {k: v for k in SCALAR_METRICS if (v := getattr(self, k)) is not None}


def compute_metrics(
    R: ArrayLike,
    *,
    higher_is_better: bool = True,
    baseline: ArrayLike | None = None,
    within_task: Sequence[ArrayLike | None] | None = None,
) -> dict[str, MetricValue]:
    """Continual-learning metrics of the result matrix ``R`` as a JSON-ready dict.

    ``R``: ``(T, T)``, row ``i`` = after training task ``i``, column ``j`` = evaluated task ``j``,
    unfilled rows NaN. ``higher_is_better=False`` for loss matrices (metrics are computed on
    ``-R``; see the module docstring). ``baseline``: length-``T`` performance of the initial model
    on each task, needed for ``fwt``. ``within_task``: length-``T`` sequence, ``within_task[k]`` the
    performances on task ``k`` measured during its own training (last one at its end), used by the
    LIBERO metrics; entries for tasks not yet learned may be ``None``.

    Keys: ``num_tasks``, ``tasks_learned``, ``higher_is_better``, the scalars in
    :data:`SCALAR_METRICS` (``None`` when undefined) and ``forgetting_per_task`` (length ``T``).
    Raises ``ValueError`` on malformed input; partial matrices are fine.
    """
    return CLMetrics.from_matrix(
        R, higher_is_better=higher_is_better, baseline=baseline, within_task=within_task
    ).to_dict()
