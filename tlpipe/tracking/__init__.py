"""MLflow: the client and store, stage and model runs, logging, the model registry."""
