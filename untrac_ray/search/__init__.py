"""Hyperparameter searches on Ray Tune (`tune`): the space and objective, the trials, the
driver, the state a resumed search reads, and each trial as a nested MLflow run."""
