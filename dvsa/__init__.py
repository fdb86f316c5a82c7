"""dvsa: Deep Visual-Semantic Alignments (Karpathy & Fei-Fei) as a distributed system on Ray."""

__version__ = "0.1.0"
