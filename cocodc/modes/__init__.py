"""The training modes, each built from the trainer's shared parts (trainer.py)."""
