"""Simulators: demonstrations recorded with scripted experts, and closed-loop evaluation.

* :mod:`cl_vla.envs.metaworld`: Meta-World tasks as lerobot defines them (names, instructions,
  experts), fast offscreen rendering, and the worker processes that step and render environments;
* :mod:`cl_vla.envs.metaworld_record`: scripted-expert demonstrations -> a cached LeRobot dataset
  (``data=metaworld``);
* :mod:`cl_vla.envs.rollout`: success rates of a policy in vectorized Meta-World envs (``eval=sim``);
* :mod:`cl_vla.envs.libero_eval`: the same through lerobot's LIBERO env (``eval.env=libero``).

Nothing here is imported by ``import cl_vla``; the simulators load only when a run uses them.
"""
