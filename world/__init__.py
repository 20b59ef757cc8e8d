"""A small procedural image world (64x64 scenes, captions, a concept, evaluators) for measuring D-OPSD against SFT."""
