"""Evaluation data, scoring, zero-shot evaluation, GLUE fine-tuning, statistics."""
