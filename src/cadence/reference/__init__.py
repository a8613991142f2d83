"""The project's own trained reference models: procedural captioned data, trainer, checkpoints, pipelines."""
