"""Evaluation and inference: held-out loss / perplexity / bits per byte, generation."""
