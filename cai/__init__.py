"""cai: Constitutional AI and RLAIF.

Stages: constitution (cai.constitution) -> judge service (judge_server, cai.judge_client)
-> synthetic data -> SFT / reward model / PPO or DPO -> evaluation and report.
"""

__version__ = "0.1.0"
