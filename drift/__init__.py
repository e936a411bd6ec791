"""Drift job: judge the inference log against the reference stored with the model (Evidently 0.7)."""
