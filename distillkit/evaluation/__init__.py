"""Evaluation: the generation + ROUGE-L protocol, test sets with their cell cache, and exposure bias."""
