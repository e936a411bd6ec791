"""Hand-rolled baselines the service is compared with (`python -m loadtest.run --compare`)."""
