"""The Ray and MLflow layer: Ray Train driver and worker, MLflow tracking. Only this package imports ray or mlflow."""
