"""Training: `calibclip train` (losses, curriculum sampler, trainer, checkpoints)."""
