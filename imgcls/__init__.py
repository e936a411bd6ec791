"""The contract every stage shares, written once: preprocessing, image statistics, the inference-log schema,
the files of a stored model, the unfamiliar-image detector, the demo images and the one error type.

It imports neither BentoML nor torch: training, the service, the drift job and the load tester import it,
and never each other.
"""

#: The project's version (pyproject.toml reads it from here): the service shows it on /docs and /info, and a
#: Bento or container, which installs only the requirements and not this package, still has it.
__version__ = "0.1.0"
