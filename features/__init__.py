"""What the models see: CT windows and their named combinations, the HU image cache, the 2.5D
slice dataset and its augmentations (and, in ``features.tabular``, the level-2 features)."""
from features.windows import COMBINATIONS, PRESETS, get_combination, list_combinations, n_channels

__all__ = ["COMBINATIONS", "PRESETS", "get_combination", "list_combinations", "n_channels"]
