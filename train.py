#!/usr/bin/env python
"""Train a VLA policy through a sequence of tasks with a continual-learning algorithm.

python train.py algorithm=er task_sequence=libero_spatial
python train.py -m algorithm=er algorithm.replay_batch_ratio=0.1,0.3,0.5 seed=0,1,2
"""

import hydra
from omegaconf import DictConfig

from cl_vla.cli import run_main
from cl_vla.config.schema import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run_main(cfg)


if __name__ == "__main__":
    main()
