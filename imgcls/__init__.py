"""The contract every stage shares, written once: preprocessing, image statistics, the inference-log schema,
the files of a stored model, the unfamiliar-image detector, the demo images and the one error type.

It imports neither BentoML nor torch: training, the service, the drift job and the load tester import it,
and never each other.
"""
