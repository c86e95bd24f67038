"""The LCI model family: XATL blocks with attention, Mamba-1 and Mamba-2 mixers."""

from megaxatl.models.generation import generate, sample_next
from megaxatl.models.lm import LM, build, count_parameters
from megaxatl.config.pattern import MIXERS, hybrid_pattern, parse_pattern

__all__ = ["LM", "MIXERS", "build", "count_parameters", "generate", "hybrid_pattern", "parse_pattern", "sample_next"]
