"""Synthetic data: critique-revision SFT sets (`sft`) and AI-labelled preference sets (`prefs`)."""
