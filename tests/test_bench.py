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


def test_rows_give_ratios_to_sequential_and_bytes_per_stored_sample():
    rows = {
        "er": {"steps_per_s": 9.0, "state_bytes": 2240, "stored": 280, "decoded_bytes": 98_662},
        "sequential": {"steps_per_s": 12.0, "state_bytes": 0, "stored": 0, "decoded_bytes": 98_662},
        "ewc": {"steps_per_s": 6.0, "state_bytes": 3 * 2**20, "stored": 0, "decoded_bytes": 98_662},
    }
    header, cells = bench.bench_rows(rows)
    assert header[-1] == "bytes/stored sample (decoded: 98,662)"
    assert cells[0] == ["er", "9.00", "0.750", "2.2 KiB", "280", "8.0"]
    assert cells[1] == ["sequential", "12.00", "1.000", "0.0 KiB", "-", "-"]
    assert cells[2] == ["ewc", "6.00", "0.500", "3.0 MiB", "-", "-"]
