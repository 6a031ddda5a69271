"""Reports over every level: plots of any folder of OOF predictions, the HTML report, the demo's summary table.

The top floor, beside ``prediction``: it reads what competition, features, level 1 and level 2 wrote
(and draws level-1 explanation panels); nothing below imports it.
``python -m reports.plots`` (after ``make oof`` / ``make stack``), ``python -m reports.html_report``
(``make report``), ``python -m reports.summary`` (the end of ``make demo``).
"""
