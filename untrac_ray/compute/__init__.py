"""Plain PyTorch: models, the training loop, the unlearning loop, evaluation, the gradient
baselines, numerics and memory. No Ray, no MLflow; imports only `inputs`."""
