"""Predict a new head CT with a trained ensemble, and hand the ensemble on as one archive.

The floor above level 2: it imports competition, features, level1_models and level2_stacking;
nothing imports it. ``python -m prediction predict --study DIR`` and ``make predict``;
``python -m prediction export`` and ``make export``.
"""
