"""Collectors: one per source of facts, each yielding metric families and nothing else."""
