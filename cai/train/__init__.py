"""Training: SFT, reward model (Bradley-Terry on soft labels), DPO and PPO, with LoRA via peft."""
