"""qanac: compile convolutional networks for neuromorphic hardware, verified against the float model."""

__version__ = "0.1.0"
