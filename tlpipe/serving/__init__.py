"""The image-taking pyfunc model (loading, predicting, packaging) and predictions."""
