"""The evaluate stage: metrics, the gate, the report, ensembles and comparisons."""
