"""Training: linear SVMs, the networks and the select stage's linear probes."""
