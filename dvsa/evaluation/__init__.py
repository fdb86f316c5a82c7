"""Evaluation: caption metrics (pycocoevalcap) and image-sentence retrieval (R@K)."""
