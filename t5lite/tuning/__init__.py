"""Hyperparameter search over gin bindings (python -m t5lite.sweep): the search space, one trial's
training runs, the shared Optuna study and its workers, the results table and plot.

    space.py    --grid / --random / --bayes specs -> Params (a gin binding and its distribution)
    trials.py   one trial: `python -m t5lite.train` per fold, its evaluations reported, pruned if bad
    study.py    the study in SWEEP_DIR/study.journal: claiming trials, retrying interrupted ones
    report.py   results.md / results.csv and results.png
"""
