"""The decoding loop: plain and speculative generation, trees, verification, sampling, tree policies."""
