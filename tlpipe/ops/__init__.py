"""Processes and servers: PostgreSQL/MLflow and Prefect servers, locks, process groups, Dask."""
