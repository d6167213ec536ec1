"""Online RL against a reward: the shared rollout, scoring, reference and checkpointing, and one file per algorithm."""
