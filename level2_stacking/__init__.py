"""Level 2: neighbour/study features over every level-1 model's predictions, LightGBM per label, Optuna."""
