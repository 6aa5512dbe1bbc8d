"""The networks of the finetune stage: data, layers, caches, fitting and the stage's training entry point."""
