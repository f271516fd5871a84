"""Following runs while and after they train: Lightning loggers and the progress bar
(:mod:`.loggers`), offline W&B files (:mod:`.wandb_offline`), and Hydra sweep bookkeeping
(:mod:`.sweep`)."""
