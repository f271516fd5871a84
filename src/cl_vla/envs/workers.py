"""Simulation worker processes shared by every simulator (Meta-World, LIBERO).

A *handler* is an object whose methods step and render environments (``reset``, ``step``, ...); each
worker process builds one from a picklable factory and answers calls on a pipe. ``num_workers=0`` runs
one handler in this process instead, with the same interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from cl_vla.errors import CLVLAError


class SimulatorError(CLVLAError):
    """A simulator worker failed, hung or died: one sentence instead of a traceback."""


def _worker_main(conn: Any, make_handler: Callable[[], Any]) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # simulators warn on import and reset
    handler = None
    try:
        while True:
            try:
                method, args = conn.recv()
            except (EOFError, KeyboardInterrupt):
                break
            if method == "close":
                break
            try:
                handler = handler or make_handler()
                conn.send(("ok", getattr(handler, method)(*args)))
            except CLVLAError as e:
                conn.send(("error", e))
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
    finally:
        if handler is not None:
            handler.close()  # GL contexts before interpreter exit, or EGL complains on stderr


class SimWorkers:
    """``num_workers`` spawned processes (0: this process), each holding its own environments.

    ``submit(i, method, *args)`` sends a call to worker ``i``; ``result(i)`` waits for it. Spawned (not
    forked): no GL context, torch thread pool or logging lock of this process leaks into a worker.
    """

    def __init__(
        self,
        make_handler: Callable[[], Any],
        num_workers: int,
        timeout_s: float = 300.0,
        *,
        name: str = "simulation",
    ) -> None:
        self.timeout_s, self.name = timeout_s, name
        self._local: Any = None
        self._pending: list[Any] = []
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        if num_workers <= 0:
            self._local = make_handler()
            self._pending = [None]
            return
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        for _ in range(num_workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, make_handler), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._pending = [None] * num_workers

    @property
    def size(self) -> int:
        return len(self._pending)

    def submit(self, i: int, method: str, *args: Any) -> None:
        if self._local is not None:
            try:
                self._pending[i] = ("ok", getattr(self._local, method)(*args))
            except CLVLAError as e:
                self._pending[i] = ("error", e)
            return
        self._conns[i].send((method, args))
        self._pending[i] = "sent"

    def result(self, i: int) -> Any:
        if self._local is None:
            conn = self._conns[i]
            if not conn.poll(self.timeout_s):
                raise SimulatorError(
                    f"A {self.name} simulator worker gave no answer within {self.timeout_s:.0f} s; "
                    "raise eval.timeout_s or lower eval.episodes (the last checkpoint is intact)."
                )
            try:
                self._pending[i] = conn.recv()
            except EOFError as e:
                code = self._procs[i].exitcode
                raise SimulatorError(
                    f"A {self.name} simulator worker process died (exit code {code}); "
                    "the last checkpoint is intact: resume=<run dir> continues from it."
                ) from e
        status, value = self._pending[i]
        self._pending[i] = None
        if status == "error":
            if isinstance(value, BaseException):
                raise value
            raise SimulatorError(f"A {self.name} simulator worker failed: {value}")
        return value

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run ``method`` on every worker and wait for all answers."""
        for i in range(self.size):
            self.submit(i, method, *args)
        return [self.result(i) for i in range(self.size)]

    def ready(self, timeout: float | None = None) -> list[int]:
        """Workers with an answer waiting (all pending ones in-process)."""
        if self._local is not None:
            return [0] if self._pending[0] is not None else []
        from multiprocessing.connection import wait

        waiting = [c for c, p in zip(self._conns, self._pending, strict=True) if p == "sent"]
        done = wait(waiting, timeout if timeout is not None else self.timeout_s)
        return [self._conns.index(c) for c in done]

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
            return
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(("close", ()))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []

    def __enter__(self) -> SimWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
