"""Scoring a policy on every task: the held-out action loss (:mod:`.heldout`), closed-loop success in
a simulator (:mod:`.simulators`, which picks Meta-World's or LIBERO's evaluator from ``cl_vla.envs``),
and the continual-learning metrics over the matrix R (:mod:`.metrics`)."""
