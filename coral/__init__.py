"""Synthesize multimodal retrieval training data, train and serve retrievers on Ray."""

__version__ = "0.1.0"
