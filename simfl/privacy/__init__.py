"""Privacy: the attacks, the defences, and how leakage is measured.

``attacks/`` and ``defences/`` hold the plugins (each defined, configured and
registered in one module); ``metrics``, ``evaluator`` and ``disclosure`` score
reconstructions; ``decoders`` are the learned feature decoders both sides use.
It stands on :mod:`simfl.core` and :mod:`simfl.data` and knows nothing of
rounds, actors or studies.
"""
