"""Continual-learning metrics against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cl_vla.evaluation.metrics import (
    LEVEL_METRICS,
    SCALAR_METRICS,
    CLMetrics,
    compute_metrics,
    last_filled_row,
    validate_matrix,
)

# Success rates: rows = after training task i, columns = evaluated task j.
R3 = [
    [0.8, 0.1, 0.0],
    [0.6, 0.9, 0.2],
    [0.5, 0.7, 0.9],
]
BASELINE3 = [0.0, 0.05, 0.1]
WITHIN3 = [[0.2, 0.9, 0.8], [0.5, 0.9], [0.3, 0.6, 0.9]]

# Held-out action losses (lower is better).
LOSS3 = [
    [0.2, 0.9, 1.0],
    [0.5, 0.1, 0.8],
    [0.6, 0.3, 0.15],
]
LOSS_BASELINE3 = [1.0, 1.0, 1.2]


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-12)


def test_hand_example_3x3() -> None:
    m = compute_metrics(R3, baseline=BASELINE3)
    assert m["num_tasks"] == 3 and m["tasks_learned"] == 3 and m["higher_is_better"] is True
    assert m["acc"] == approx(0.7)  # (0.5 + 0.7 + 0.9) / 3
    assert m["acc_all"] == approx(0.7)
    assert m["learning_accuracy"] == approx(2.6 / 3)  # (0.8 + 0.9 + 0.9) / 3
    assert m["bwt"] == approx(-0.25)  # ((0.5 - 0.8) + (0.7 - 0.9)) / 2
    assert m["fwt"] == approx(0.075)  # ((0.1 - 0.05) + (0.2 - 0.1)) / 2
    assert m["forgetting_per_task"] == [approx(0.3), approx(0.2), None]  # 0.8-0.5, 0.9-0.7
    assert m["forgetting"] == approx(0.25)
    assert m["max_forgetting"] == approx(0.3)


def test_libero_metrics_without_within_task_use_the_diagonal() -> None:
    m = compute_metrics(R3)
    assert m["fwt"] is None  # no baseline
    assert m["libero_fwt"] == approx(2.6 / 3)  # mean of the diagonal
    # NBT_0 = ((0.8-0.6) + (0.8-0.5)) / 2 = 0.25, NBT_1 = 0.9 - 0.7 = 0.2; the last task has none.
    assert m["libero_nbt"] == approx(0.225)
    # AUC_0 = (0.8+0.6+0.5)/3, AUC_1 = (0.9+0.7)/2 = 0.8, AUC_2 = 0.9
    assert m["libero_auc"] == approx((1.9 / 3 + 0.8 + 0.9) / 3)


def test_libero_metrics_with_within_task_points() -> None:
    m = compute_metrics(R3, within_task=WITHIN3)
    # FWT_k = mean within-task points: 1.9/3, 1.4/2 = 0.7, 1.8/3 = 0.6
    assert m["libero_fwt"] == approx((1.9 / 3 + 0.7 + 0.6) / 3)
    # c_kk = best within-task point = 0.9 for both: NBT_0 = (0.3 + 0.4) / 2 = 0.35, NBT_1 = 0.2
    assert m["libero_nbt"] == approx(0.275)
    # AUC_0 = (1.9/3 + 0.6 + 0.5)/3, AUC_1 = (0.7 + 0.7)/2 = 0.7, AUC_2 = 0.6
    assert m["libero_auc"] == approx(((1.9 / 3 + 1.1) / 3 + 0.7 + 0.6) / 3)
    # The classic metrics do not depend on the within-task points.
    assert m["bwt"] == approx(-0.25)


def test_partial_matrix_reports_the_metrics_so_far() -> None:
    R = np.array(R3)
    R[2] = np.nan
    m = compute_metrics(R, baseline=BASELINE3, within_task=[[0.9], [0.9], None])
    assert m["tasks_learned"] == 2
    assert m["acc"] == approx(0.75)  # (0.6 + 0.9) / 2
    assert m["acc_all"] == approx(1.7 / 3)  # (0.6 + 0.9 + 0.2) / 3
    assert m["learning_accuracy"] == approx(0.85)
    assert m["bwt"] == approx(-0.2)  # 0.6 - 0.8
    assert m["fwt"] == approx(0.075)  # both terms use rows 0 and 1 only
    assert m["forgetting_per_task"] == [approx(0.2), None, None]
    assert m["forgetting"] == approx(0.2)
    assert m["libero_nbt"] == approx(0.3)  # best 0.9 - 0.6
    assert m["libero_auc"] == approx(((0.9 + 0.6) / 2 + 0.9) / 2)


def test_single_row_and_empty_matrix_never_crash() -> None:
    R = np.full((3, 3), np.nan)
    empty = compute_metrics(R, baseline=BASELINE3)
    assert empty["tasks_learned"] == 0
    assert all(empty[k] is None for k in SCALAR_METRICS)
    assert empty["forgetting_per_task"] == [None, None, None]

    R[0] = [0.4, 0.2, 0.1]
    one = compute_metrics(R, baseline=BASELINE3)
    assert one["acc"] == approx(0.4) and one["acc_all"] == approx(0.7 / 3)
    assert one["bwt"] is None and one["forgetting"] is None and one["libero_nbt"] is None
    assert one["fwt"] == approx(0.15)  # only term j=1: 0.2 - 0.05
    assert one["libero_auc"] == approx(0.4)


def test_one_task_sequence() -> None:
    m = compute_metrics([[0.7]], baseline=[0.1])
    assert m["acc"] == approx(0.7)
    assert m["bwt"] is None and m["fwt"] is None and m["forgetting"] is None


def test_loss_matrix_sign_convention() -> None:
    m = compute_metrics(LOSS3, higher_is_better=False, baseline=LOSS_BASELINE3)
    # Level metrics stay in loss units.
    assert m["acc"] == approx(0.35)  # (0.6 + 0.3 + 0.15) / 3
    assert m["learning_accuracy"] == approx(0.15)  # (0.2 + 0.1 + 0.15) / 3
    assert m["libero_fwt"] == approx(0.15)
    assert m["libero_auc"] == approx((1.3 / 3 + 0.2 + 0.15) / 3)
    # Losses went up on old tasks: negative BWT, positive forgetting, exactly as for success rates.
    assert m["bwt"] == approx(-0.3)  # -((0.6 - 0.2) + (0.3 - 0.1)) / 2
    assert m["forgetting_per_task"] == [approx(0.4), approx(0.2), None]  # 0.6-0.2, 0.3-0.1
    assert m["forgetting"] == approx(0.3)
    assert m["max_forgetting"] == approx(0.4)
    assert m["libero_nbt"] == approx(0.275)  # ((0.5-0.2) + (0.6-0.2))/2 = 0.35 and 0.3-0.1 = 0.2
    # Zero-shot loss below the untrained model's: positive forward transfer.
    assert m["fwt"] == approx(0.25)  # ((1.0 - 0.9) + (1.2 - 0.8)) / 2


def test_loss_forgetting_uses_the_lowest_loss_as_best() -> None:
    # Task 0's loss dips to 0.1 after task 1, then rises to 0.4: forgetting is 0.3 from the best.
    L = [[0.3, 1.0, 1.0], [0.1, 0.2, 1.0], [0.4, 0.2, 0.2]]
    m = compute_metrics(L, higher_is_better=False)
    assert m["forgetting_per_task"][0] == approx(0.3)
    assert m["forgetting_per_task"][1] == approx(0.0)


def test_loss_within_task_best_is_the_minimum() -> None:
    L = [[0.3, 1.0], [0.5, 0.2]]
    m = compute_metrics(L, higher_is_better=False, within_task=[[0.9, 0.25, 0.3], [0.6, 0.2]])
    assert m["libero_nbt"] == approx(0.25)  # best 0.25 -> 0.5
    assert m["libero_fwt"] == approx(((0.9 + 0.25 + 0.3) / 3 + 0.4) / 2)


def test_forgetting_ignores_zero_shot_rows() -> None:
    # Task 1 scored 0.9 zero-shot before it was learned; that is not counted as forgotten.
    R = [[0.5, 0.9, 0.0], [0.5, 0.6, 0.0], [0.5, 0.6, 0.7]]
    assert compute_metrics(R)["forgetting_per_task"][:2] == [approx(0.0), approx(0.0)]


def test_cl_metrics_dataclass() -> None:
    cm = CLMetrics.from_matrix(R3)
    assert cm.to_dict() == compute_metrics(R3)
    scalars = cm.scalars()
    assert "fwt" not in scalars and scalars["bwt"] == approx(-0.25)
    assert all(isinstance(v, float) for v in scalars.values())


def test_last_filled_row() -> None:
    R = np.full((3, 3), np.nan)
    assert last_filled_row(R) == -1
    R[:2] = 0.5
    assert last_filled_row(R) == 1


@pytest.mark.parametrize(
    ("R", "message"),
    [
        (np.zeros((2, 3)), "square"),
        (np.zeros(3), "square"),
        (np.zeros((0, 0)), "at least one task"),
        ([[0.1, "x"], [0.2, 0.3]], "floats"),
        ([[0.1, math.inf], [0.2, 0.3]], "infinite"),
        ([[0.1, 0.4], [math.nan, 0.3]], "partly filled"),
        ([[math.nan, math.nan], [0.2, 0.3]], "task order"),
    ],
)
def test_validate_matrix_errors(R: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_matrix(R)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        compute_metrics(R)  # type: ignore[arg-type]


def test_seen_tasks_only_matrix_gives_every_metric_that_needs_no_unseen_task() -> None:
    # eval.evaluate_unseen=false: row i holds tasks 0..i only.
    R = [[0.9, None, None], [0.5, 0.8, None], [0.4, 0.6, 1.0]]
    m = compute_metrics(R, baseline=[0.0, 0.0, 0.0])
    assert m["acc"] == pytest.approx((0.4 + 0.6 + 1.0) / 3)
    assert m["bwt"] == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2)
    assert m["fwt"] is None  # needs each task evaluated before its training
    assert m["acc_all"] == pytest.approx(m["acc"])  # the last row holds every task
    partial = compute_metrics([[0.9, None, None], [0.5, 0.8, None], [None, None, None]])
    assert partial["tasks_learned"] == 2 and partial["acc"] == pytest.approx(0.65)
    assert partial["acc_all"] is None


def test_validate_matrix_reads_none_as_nan_and_copies() -> None:
    src = np.array([[0.1, 0.2], [np.nan, np.nan]])
    out = validate_matrix(src)
    out[0, 0] = 9.0
    assert src[0, 0] == 0.1
    assert np.isnan(validate_matrix([[0.1, 0.2], [None, None]])[1]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": [0.0, 0.1]}, "shape"),
        ({"baseline": [0.0, math.nan, 0.0]}, "finite"),
        ({"within_task": [[0.1], [0.2]]}, "sequence of 3"),
        ({"within_task": [[0.1], [], [0.3]]}, r"within_task\[1\]"),
        ({"within_task": [[0.1], [0.2], [math.inf]]}, "finite"),
    ],
)
def test_bad_side_inputs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(R3, **kwargs)


unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def square(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(1, 6))
    return draw(arrays(np.float64, (n, n), elements=unit))


@settings(max_examples=60, deadline=None)
@given(square(), st.booleans())
def test_no_change_after_learning_means_no_forgetting(A: np.ndarray, higher_is_better: bool) -> None:
    # Freeze each column from its diagonal on: performance never changes once a task is learned.
    R = A.copy()
    for j in range(len(R)):
        R[j:, j] = R[j, j]
    m = compute_metrics(R, higher_is_better=higher_is_better)
    if len(R) > 1:
        assert m["bwt"] == approx(0.0)
        assert m["forgetting"] == approx(0.0)
        assert m["libero_nbt"] == approx(0.0)
    assert m["acc"] == approx(float(np.mean(np.diag(R))))


@settings(max_examples=60, deadline=None)
@given(square())
def test_loss_view_is_the_negated_success_view(A: np.ndarray) -> None:
    base = np.linspace(0.1, 0.2, len(A))
    up = compute_metrics(A, baseline=base)
    down = compute_metrics(-A, higher_is_better=False, baseline=-base)
    for key in SCALAR_METRICS:
        if up[key] is None:
            assert down[key] is None
        else:
            # Level metrics stay in R's units (negated), difference metrics keep their sign.
            expected = -up[key] if key in LEVEL_METRICS else up[key]
            assert down[key] == pytest.approx(expected, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(square())
def test_forgetting_bounds(A: np.ndarray) -> None:
    m = compute_metrics(A)
    if len(A) > 1:
        # f_j >= R[j,j] - R[L,j] term by term, so forgetting is at least -BWT.
        assert m["forgetting"] >= -m["bwt"] - 1e-12
        assert m["max_forgetting"] >= m["forgetting"] - 1e-12
    assert 0.0 <= m["acc"] <= 1.0 and 0.0 <= m["libero_auc"] <= 1.0


def test_perfect_learner_without_zero_shot_transfer() -> None:
    # Every task solved once learned and never forgotten, nothing solved zero-shot.
    R = np.tril(np.ones((4, 4)))
    m = compute_metrics(R, baseline=np.zeros(4))
    assert m["acc"] == 1.0 and m["learning_accuracy"] == 1.0 and m["libero_auc"] == 1.0
    assert m["bwt"] == 0.0 and m["forgetting"] == 0.0 and m["fwt"] == 0.0 and m["libero_nbt"] == 0.0
    assert m["acc_all"] == 1.0


# ---------------------------------------------------------------------- LIBERO's code, transcribed


def _libero_learn_one_task(successes: list[float]) -> float:
    """The success bookkeeping of LIBERO's ``Sequential.learn_one_task`` (libero/lifelong/algos/base.py).

    ``successes[0]`` is the zero-shot evaluation (epoch 0), then one evaluation every ``eval_every``
    epochs; the return value is LIBERO's ``S_fwd[task]``.
    """
    prev_success_rate = -1.0
    idx_at_best_succ = 0
    cumulated_counter = 0.0
    recorded = []
    for success_rate in successes:
        recorded.append(success_rate)
        if prev_success_rate < success_rate:
            prev_success_rate = success_rate
            idx_at_best_succ = len(recorded) - 1
        cumulated_counter += 1.0
    out = np.array(recorded)
    out[idx_at_best_succ:] = recorded[idx_at_best_succ]
    return out.sum() / cumulated_counter


def _libero_compute_metric(res):
    """LIBERO's ``compute_metric``, verbatim (``notebooks/quick_guide_algo.ipynb``, Sec. 5.2, cell 13).

    ``res = (mat, fwts)``: ``mat`` the success confusion matrix ``S_conf_mat`` with a seed axis,
    ``(num_tasks, num_tasks, num_seeds)``; ``fwts`` ``(num_tasks, num_save_intervals, num_seeds)``, each
    curve held at its best point by the notebook's ``get_auc``. Only the loops' formatting is ours.
    """
    mat, fwts = res  # fwds: (num_tasks, num_save_intervals, num_seeds)
    num_tasks, num_seeds = mat.shape[1:]
    ret = {}

    # compute fwt
    fwt = fwts.mean(axis=(0, 1))
    ret["fwt"] = fwt
    # compute bwt
    bwts = []
    aucs = []
    for seed in range(num_seeds):
        bwt = 0.0
        auc = 0.0
        for k in range(num_tasks):
            bwt_k = 0.0
            auc_k = 0.0
            for tau in range(k + 1, num_tasks):
                bwt_k += mat[k, k, seed] - mat[tau, k, seed]
                auc_k += mat[tau, k, seed]
            if k + 1 < num_tasks:
                bwt_k /= num_tasks - k - 1
            auc_k = (auc_k + fwts[k, :, seed].mean()) / (num_tasks - k)

            bwt += bwt_k
            auc += auc_k
        bwts.append(bwt / num_tasks)
        aucs.append(auc / num_tasks)
    bwts = np.array(bwts)
    aucs = np.array(aucs)
    ret["bwt"] = bwts
    ret["auc"] = aucs
    return ret


def _libero_get_auc(curves: list[list[float]]) -> np.ndarray:
    """The notebook's ``get_auc`` for one seed: each task's curve held at its first best point."""
    fwds = np.zeros((len(curves), len(curves[0]), 1))
    for task, curve in enumerate(curves):
        succ = np.array(curve)
        idx = succ.argmax()
        succ[idx:] = succ[idx]
        fwds[task, :, 0] = succ
    return fwds


def _paper_metrics(R: np.ndarray, curves: list[list[float]]) -> tuple[float, float, float]:
    """FWT, NBT, AUC as LIBERO's paper writes them (Sec. 5), 0-based, over the ``K`` learned tasks:
    ``c_kk`` the best point of task ``k``'s curve, NBT averaged over the ``K - 1`` tasks that have one."""
    K = len(curves)
    best = [max(c) for c in curves]
    fwt_k = [float(np.mean(c)) for c in curves]
    nbt = [np.mean([best[k] - R[t, k] for t in range(k + 1, K)]) for k in range(K - 1)]
    auc = [(fwt_k[k] + sum(R[t, k] for t in range(k + 1, K))) / (K - k) for k in range(K)]
    return float(np.mean(fwt_k)), float(np.mean(nbt)), float(np.mean(auc))


def _random_run(rng: np.random.Generator, T: int, points: int, n_eval: int = 10):
    """A run's R and within-task curves as cl_vla records them: zero-shot first, the task's end last."""
    R = rng.integers(0, n_eval + 1, size=(T, T)) / n_eval
    within = []
    for k in range(T):
        curve = list(rng.integers(0, n_eval + 1, size=points) / n_eval)
        curve[-1] = R[k, k]  # the loop's last point is the end-of-task row's diagonal
        within.append(curve)
    return R, within


@pytest.mark.parametrize("seed", range(20))
def test_libero_code_convention_equals_libero_code_on_random_runs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = int(rng.integers(2, 8))
    R, within = _random_run(rng, T, points=int(rng.integers(2, 12)))
    m = compute_metrics(R, within_task=within)

    # LIBERO's S_fwd is learn_one_task's return value and the mean of get_auc's held curve.
    S_fwd = np.array([_libero_learn_one_task(curve) for curve in within])
    fwts = _libero_get_auc(within)
    assert fwts.mean(axis=1)[:, 0] == pytest.approx(S_fwd, abs=1e-12)
    # R's diagonal is the success matrix's diagonal: the evaluation at the task's end.
    ret = _libero_compute_metric((R[..., np.newaxis], fwts))
    assert m["libero_fwt_code"] == pytest.approx(ret["fwt"][0], abs=1e-12)
    assert m["libero_nbt_code"] == pytest.approx(ret["bwt"][0], abs=1e-12)
    assert m["libero_auc_code"] == pytest.approx(ret["auc"][0], abs=1e-12)
    # The paper's formulas: the curve as recorded, c_kk its best point, NBT over K - 1 tasks.
    fwt, nbt, auc = _paper_metrics(R, within)
    assert m["libero_fwt"] == pytest.approx(fwt, abs=1e-12)
    assert m["libero_nbt"] == pytest.approx(nbt, abs=1e-12)
    assert m["libero_auc"] == pytest.approx(auc, abs=1e-12)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_libero_nbt_code_of_a_partial_run_is_compute_metric_on_the_learned_prefix(K: int) -> None:
    rng = np.random.default_rng(K)
    T = 6
    R, within = _random_run(rng, T, points=4)
    R[K:] = np.nan
    m = compute_metrics(R, within_task=within[:K] + [None] * (T - K))
    ret = _libero_compute_metric((R[:K, :K, np.newaxis], _libero_get_auc(within[:K])))
    assert m["libero_nbt_code"] == pytest.approx(ret["bwt"][0], abs=1e-12)
    assert m["libero_auc_code"] == pytest.approx(ret["auc"][0], abs=1e-12)


def test_libero_nbt_code_by_hand_and_for_losses() -> None:
    m = compute_metrics(R3, within_task=WITHIN3)
    # Diagonal 0.8, 0.9: NBT_0 = ((0.8-0.6) + (0.8-0.5)) / 2 = 0.25, NBT_1 = 0.2, NBT_2 = 0; / 3 tasks.
    assert m["libero_nbt_code"] == approx(0.45 / 3)
    assert m["libero_nbt"] == approx(0.275)  # the paper's: best points 0.9, 0.9, over 2 tasks
    # Losses are negated like every other metric: losing ground is positive.
    lm = compute_metrics(LOSS3, higher_is_better=False)
    assert lm["libero_nbt_code"] == approx(((0.3 + 0.4) / 2 + 0.2 + 0.0) / 3)
    # One task learned: nothing can have been forgotten; undefined, as the paper's NBT.
    one = compute_metrics([[0.5, np.nan], [np.nan, np.nan]])
    assert one["libero_nbt_code"] is None and one["libero_nbt"] is None


def test_the_paper_and_code_nbt_differ_on_almost_every_random_run() -> None:
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(300):
        R, within = _random_run(rng, 5, points=6)
        m = compute_metrics(R, within_task=within)
        gaps.append(abs(m["libero_nbt_code"] - m["libero_nbt"]))
    assert sum(g > 1e-12 for g in gaps) >= 295 and max(gaps) > 0.1
    # Without within-task curves c_kk is the diagonal in both: only the 1/K against 1/(K-1) remains.
    m = compute_metrics(R3)
    assert m["libero_nbt_code"] == approx(m["libero_nbt"] * 2 / 3)


def test_the_two_libero_conventions_differ_only_when_a_curve_peaks_early() -> None:
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(500):
        R, within = _random_run(rng, 5, points=6)
        m = compute_metrics(R, within_task=within)
        gaps.append(m["libero_fwt_code"] - m["libero_fwt"])
        assert m["libero_fwt_code"] >= m["libero_fwt"] - 1e-12  # holding the best never lowers a curve
    assert max(gaps) > 0.1
    rising = [[0.0, 0.3, 0.6, 0.8], [0.2, 0.5, 0.9]]  # peaks at the end: the conventions agree
    m = compute_metrics(np.array([[0.8, 0.0], [0.7, 0.9]]), within_task=rising)
    assert m["libero_fwt_code"] == pytest.approx(m["libero_fwt"])
    assert m["libero_auc_code"] == pytest.approx(m["libero_auc"])
    early = [[0.0, 1.0, 0.2, 0.2], [0.2, 0.5, 0.9]]  # task 0 peaks at its second point
    m = compute_metrics(np.array([[0.2, 0.0], [0.7, 0.9]]), within_task=early)
    assert m["libero_fwt_code"] == pytest.approx(((0.0 + 1.0 * 3) / 4 + 1.6 / 3) / 2)
    assert m["libero_fwt"] == pytest.approx((1.4 / 4 + 1.6 / 3) / 2)


def test_libero_nbt_code_is_in_the_terminal_table_and_the_sweep_direction() -> None:
    from io import StringIO

    from rich.console import Console

    from cl_vla.results.run_files import METRIC_LABELS, format_metrics_table
    from cl_vla.results.sweep_report import _direction

    assert set(METRIC_LABELS) == set(SCALAR_METRICS)
    console = Console(file=StringIO(), width=200)
    console.print(format_metrics_table(compute_metrics(R3, within_task=WITHIN3)))
    row = next(ln for ln in console.file.getvalue().splitlines() if "LIBERO NBT (code)" in ln)
    assert "+0.150" in row  # 0.45 / 3, as worked out above
    assert _direction("libero_nbt_code", True) == "↓"  # lost performance: lower is better
