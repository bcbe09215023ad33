"""herl_core: the HeRL algorithm library (no Prefect, MLflow or DVC imports); README.md "Layout" lists its modules."""
