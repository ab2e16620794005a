"""msmoe-plan: memory and step time of an MoE training run before it is queued (docs/planning.md)."""
