"""The engine's pure logic: the scenario, one round, and what a run writes.

The scenario joins every section and plugin config; ``round`` samples,
configures and aggregates; ``client_work`` is what a client actor does for its
clients; ``victim`` captures what an attacked client shares; ``run_tables`` and
``run_log`` are the run directory's Parquet tables. No Ray here: the actors
that drive this code live in :mod:`simfl.simulation`.
"""
