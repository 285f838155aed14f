"""Training: the loop (``trainer``), the compiled train step (``step``), optimizers and learning-rate
schedules (``optim``), EMA (``ema``), checkpoints and resume (``checkpointing``), the output folder's
checks, lock and log file (``outputs``), LoRA adapters (``lora``).

Entry point: ``train.py`` at the repository root. Submodules import MindSpore; import them directly.
"""
