"""Training glue: data, models, the Lightning module, callbacks and the Hydra entry point."""
