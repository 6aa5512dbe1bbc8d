"""tlpipe: the transfer-learning pipeline's core (plain Python; flows and tasks wire it)."""
