"""fedp2eft: federated learning to personalize PEFT for multilingual language models."""

__version__ = "0.1.0"
