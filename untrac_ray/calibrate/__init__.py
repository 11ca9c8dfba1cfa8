"""Calibration: which estimate to trust for a job, measured on a small proxy of it (`calibrate`).

proxy.py shrinks the job, candidates.py names the estimates tried, study.py runs and scores
them against retraining on one draw, choice.py picks one on selection draws and reports it on
held-out ones, driver.py puts it together as one MLflow parent run with nested runs.
"""
