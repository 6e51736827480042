"""Reading results back: a run's or a study's tables as tidy metrics with intervals.

Shared by a single run (its arms summary), the Python API and studies'
reports, so it sits below both the simulation and the studies.
"""
