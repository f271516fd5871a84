"""Training through a task sequence: the continual loop (:mod:`.loop`) and the run it drives
(:mod:`.continual_run`), the LightningModule around the policy (:mod:`.module`), trainer building
(:mod:`.trainer`), checkpoints and run directories (:mod:`.checkpointing`, :mod:`.run_dir`), and the
memory plan checked before a run starts (:mod:`.memory_plan`)."""
