"""Simulators: demonstrations recorded with scripted experts, and closed-loop evaluation.

* :mod:`cl_vla.envs.metaworld`: Meta-World tasks as lerobot defines them (names, instructions,
  experts) and the worker processes that step and render environments;
* :mod:`cl_vla.envs.metaworld_env`: the environments themselves (fast offscreen rendering, seeded
  resets, the environment cache);
* :mod:`cl_vla.envs.metaworld_record`: scripted-expert demonstrations -> a cached LeRobot dataset
  (``data=metaworld``);
* :mod:`cl_vla.envs.workers`: the simulation worker processes every simulator shares;
* :mod:`cl_vla.envs.metaworld_eval`: the closed-loop evaluator core (episodes over ranks, workers and
  steps) and success rates in Meta-World (``eval=sim``);
* :mod:`cl_vla.envs.libero_setup`: LIBERO without a hub or a terminal (config file, asset folder);
* :mod:`cl_vla.envs.libero_schema`: a LIBERO observation as the features of each dataset family;
* :mod:`cl_vla.envs.libero_eval`: success rates in LIBERO from its official init states.

Nothing here is imported by ``import cl_vla``; the simulators load only when a run uses them.
"""
