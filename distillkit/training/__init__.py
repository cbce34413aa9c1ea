"""Training: the step context, the trainer loop, checkpoints and the pipeline from a recipe to a student."""
