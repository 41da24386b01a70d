"""The distillation losses, the methods, the hypergradient and unrolled steps, self-distillation heads."""
