"""Adapters that put FingerReward into other libraries' loops (TRL, verl, diffusers)."""
