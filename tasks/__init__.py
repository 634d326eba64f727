"""Prefect tasks of the cyclemerge pipeline: one module per stage, and what they share."""
