"""The 2D single-label MedMNIST datasets simfl can load, by ``medmnist.INFO`` flag.

Kept as a literal so that validating a scenario does not import medmnist (and
with it torch); ``tests/data/test_medmnist_loader.py`` checks it against
``medmnist.INFO``. ChestMNIST is left out: it is multi-label, and the engine
trains single-label classifiers.
"""

MEDMNIST_2D: frozenset[str] = frozenset(
    {
        "pathmnist",
        "dermamnist",
        "octmnist",
        "pneumoniamnist",
        "retinamnist",
        "breastmnist",
        "bloodmnist",
        "tissuemnist",
        "organamnist",
        "organcmnist",
        "organsmnist",
    }
)
