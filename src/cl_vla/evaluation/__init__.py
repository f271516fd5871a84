"""Scoring a policy on every task: the held-out action loss (:mod:`.heldout`), closed-loop success in
a simulator (:mod:`.closed_loop`, the evaluator every simulator shares; :mod:`.simulators` picks
Meta-World's or LIBERO's from ``cl_vla.envs``; :mod:`.baseline_cache` keeps the untrained row), and the
continual-learning metrics over the matrix R (:mod:`.metrics`)."""
