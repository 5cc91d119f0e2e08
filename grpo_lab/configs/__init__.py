"""Hydra configuration files of grpo_lab, shipped as package data (``pkg://grpo_lab.configs``)."""
