"""Bundled YAML presets of `dinokit train` (one file per recipe; `dinokit.config.load_preset`).

Each file only sets values of the `dinokit.config.Config` dataclasses; anything it leaves out
keeps the dataclass default. Values marked `# official config` come from the official DINOv2 /
DINO training configurations.
"""
