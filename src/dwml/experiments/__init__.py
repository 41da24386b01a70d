"""Experiment configs, planning and stages, reports, the demo, Hugging Face export."""
