"""Training: the step context (``run``), the loop (``trainer``) and its parts (``accelerator``, ``batches``,
``optimizers``, ``validation``, ``checkpoints``, ``outputs``, ``teacher_signals``), and the pipeline from a recipe to a student."""
