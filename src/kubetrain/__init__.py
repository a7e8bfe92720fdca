"""kubetrain: train deep-learning models efficiently, on one machine or on Kubernetes."""

__version__ = "0.1.0"
