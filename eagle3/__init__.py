"""eagle3: lossless LLM generation speed-ups with EAGLE-3 speculative decoding."""

__version__ = "0.1.0"
