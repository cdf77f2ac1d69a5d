"""The drafters: EAGLE-3's head and the paper's other methods (EAGLE, Medusa, Hydra, SpS, prompt lookup)."""
