"""``algorithm.state_dtype`` / ``algorithm.state_device``: EWC's and SI's per-parameter state kept in
bfloat16 and/or host memory, the arithmetic unchanged (the parameters' dtype, on their device)."""

from __future__ import annotations

import pytest
import torch

from cl_vla.algorithms.ewc import EWC
from cl_vla.algorithms.quadratic_penalty import quadratic_penalty, streamed_quadratic_penalty
from cl_vla.algorithms.si import SI
from cl_vla.algorithms.state_placement import StatePlacement
from cl_vla.errors import ConfigError
from conftest import compose_config
from test_ewc import FakeModule, TinyPolicy, context, hand_penalty, make_data, shift_params


def test_streamed_penalty_equals_the_sum_of_fused_terms_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    terms = [
        (
            [torch.rand(p.shape, generator=g, dtype=p.dtype) for p in params],
            [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params],
        )
        for _ in range(3)
    ]
    fused = sum(quadratic_penalty(0.7, params, w, a) for w, a in terms)
    grads = torch.autograd.grad(fused, params)
    streamed = streamed_quadratic_penalty(0.7, params, iter(terms))
    torch.testing.assert_close(streamed, fused)
    for got, want in zip(torch.autograd.grad(streamed, params), grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("dtype", "device"), [("bfloat16", "params"), ("float32", "cpu"), ("bfloat16", "cpu")]
)
def test_ewc_keeps_its_state_as_configured_and_pays_the_same_penalty(dtype: str, device: str) -> None:
    module = FakeModule(TinyPolicy().float())
    ref, placed = EWC(ewc_lambda=5.0), EWC(ewc_lambda=5.0, state_dtype=dtype, state_device=device)
    for task in (0, 1):
        for algo in (ref, placed):
            algo.on_task_end(
                task,
                context(
                    module,
                    [{**d, "x": d["x"].float(), "y": d["y"].float()} for d in make_data(6, seed=task)],
                    task,
                ),
            )
        shift_params(module.policy, seed=10 + task)
    want = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    held = [t for d in (*placed._importance.values(), *placed._anchor.values()) for t in d.values()]
    assert held and all(t.dtype == want and t.device.type == "cpu" for t in held)
    # The arithmetic is the reference's on the stored values (bf16 rounds the Fisher and anchors only).
    expected = hand_penalty(
        module.policy,
        [
            (
                {n: f.float() for n, f in placed._importance[t].items()},
                {n: a.float() for n, a in placed._anchor[t].items()},
            )
            for t in (0, 1)
        ],
        5.0,
    )
    pen = placed.penalty(module, {}, {})
    assert pen.dtype == torch.float32 and pen.requires_grad
    torch.testing.assert_close(pen, expected, rtol=1e-5, atol=1e-6)
    tol = 2e-2 if dtype == "bfloat16" else 1e-6  # bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(pen, ref.penalty(module, {}, {}), rtol=tol, atol=tol)
    # A checkpoint keeps the stored precision, and a restored state is placed as configured.
    state = placed.state_dict()
    assert state["state_dtype"] == dtype and state["state_device"] == device
    back = EWC(ewc_lambda=5.0, state_dtype=dtype, state_device=device)
    back.load_state_dict(state)
    torch.testing.assert_close(back.penalty(module, {}, {}), pen)


def test_si_keeps_omega_anchor_and_start_in_bfloat16() -> None:
    from test_si import FakeModule as SIModule
    from test_si import ctx, train

    module = SIModule()
    algo = SI(si_c=0.5, state_dtype="bfloat16")
    train(algo, module, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), steps=3)
    algo.on_task_end(0, ctx(module, 0))
    for store in (algo._big_omega, algo._anchor):
        assert store and all(t.dtype == torch.bfloat16 for t in store.values())
    train(algo, module, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), steps=2)
    assert all(t.dtype == torch.bfloat16 for t in algo._start.values())
    assert all(t.dtype == torch.float64 for t in algo._omega.values())  # the running sum: the params
    assert torch.isfinite(algo.penalty(module, {}, {}))


def test_placement_values_and_where_they_apply_are_one_sentence() -> None:
    with pytest.raises(ValueError, match="state_dtype must be 'float32' or 'bfloat16'"):
        StatePlacement.parse("float16", "params")
    with pytest.raises(ValueError, match="state_device must be 'params' or 'cpu'"):
        StatePlacement.parse("float32", "gpu")
    from cl_vla.cli import validate_config

    for overrides, says in [
        (["algorithm=gem", "+algorithm.state_dtype=bfloat16"], "algorithm=gem keeps none"),
        (
            ["algorithm=ewc", "trainer=fsdp_cpu", "algorithm.state_device=cpu"],
            "does not run under trainer.strategy=fsdp",
        ),
    ]:
        with pytest.raises(ConfigError, match=says):
            validate_config(compose_config("experiment=smoke", *overrides))
