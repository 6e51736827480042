"""Running scenarios on Ray: the driver (``runner``) and the actors (``actors/``).

Everything Ray-specific lives here; the logic the actors run is in
:mod:`simfl.engine`, :mod:`simfl.privacy` and :mod:`simfl.data`.
"""
