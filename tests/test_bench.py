"""The benchmark's timing and argument handling (the benchmark itself runs outside the test suite)."""

from __future__ import annotations

import pytest

from cl_vla import bench


def test_steady_rate_skips_the_start_of_the_task():
    # task 1: 10 stamps; task 2: a 5 s start-up, then one step every 0.1 s
    first = [float(i) for i in range(10)]
    second = [20.0] + [25.0 + 0.1 * i for i in range(49)]
    assert bench.steady_steps_per_s(first + second, 50) == pytest.approx(10.0)


def test_steady_rate_needs_enough_steps():
    with pytest.raises(ValueError, match="--steps must be at least"):
        bench.steady_steps_per_s([0.0, 1.0], 2)


def test_stamp_hook_wraps_after_backward_and_keeps_its_result():
    class Algo:
        def after_backward(self, module, batch):
            return (module, batch)

    stamps: list[float] = []
    algo = Algo()
    bench._stamp_steps(stamps)(algo)
    assert algo.after_backward("m", "b") == ("m", "b")
    assert algo.after_backward("m", "b") == ("m", "b")
    assert len(stamps) == 2 and stamps[0] <= stamps[1]


def test_unknown_algorithm_is_one_sentence(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--algorithms", "sequential,nope"])
    err = capsys.readouterr().err
    assert "unknown algorithm(s) nope; choose from" in err and "er" in err
