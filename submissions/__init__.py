"""Kaggle submission files: write (from the stacker or one level-1 model), validate, submit.

Written files land in this folder as ``<basename of DATA>-<source>.csv.gz`` (git-ignored).
"""
