"""Studies: grids of scenarios, matched-utility searches, paired statistics, reports and calibration.

The top floor: it runs scenarios through :mod:`simfl.simulation` and reads
them back through :mod:`simfl.results`.
"""
