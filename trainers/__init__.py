"""Trainers for the evaluator (SFT, GRPO) and generator-side loops."""
