"""The method, independent of any FL engine: BT-LoRA, priors, features, PS generator, budgets, methods."""
