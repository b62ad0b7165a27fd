"""Alignment after supervised fine-tuning: reward models (``reward_model``), DPO (``dpo``) and RAFT (``raft``).

Each is its own plugin (entry point); they share the preference-pair batches and sequence scoring here.
"""
