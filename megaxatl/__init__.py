"""megaxatl: Cross-Architecture Transfer Learning into linear-cost-inference LMs."""

__version__ = "0.1.0"
