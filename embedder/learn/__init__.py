"""Heads on frozen features and fine-tuning: probe, predict, selection, finetune."""
