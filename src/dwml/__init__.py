"""dwml: teacher-less knowledge distillation (deep weighted mutual learning) for small masked language models."""

__version__ = "0.1.0"
