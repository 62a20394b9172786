"""The gcond training harness (installed as `gcond_cli`): recipes, data, models, losses, the
training loop, logging and checkpoints behind the `gcond` command (`gcond_cli.app`)."""
