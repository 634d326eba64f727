"""The pipeline's stages as pure library functions, one module per stage (``tasks/<stage>.py`` calls
``cyclemerge.stages.<stage>``): explicit inputs in, a typed result out, no Prefect, MLflow, DVC or
files. ``cyclemerge.api`` gathers them for notebooks; this package imports nothing itself, so a
stage's code dependencies are only the modules its own module imports.
"""
