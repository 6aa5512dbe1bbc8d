"""MLflow "models from code" entry point of the image classifier (:class:`tlpipe.serving.classifier.ImageClassifier`).

MLflow copies this file into every logged model and runs it when the model is
loaded, instead of unpickling a Python object: nothing is cloudpickled, so MLflow's
CloudPickle warning does not apply. The model's state comes from its artifacts in
``ImageClassifier.load_context``; loading needs ``tlpipe`` importable (it is in the
project's environment; serve with ``--env-manager local``).
"""

import mlflow

from tlpipe.serving.classifier import ImageClassifier

mlflow.models.set_model(ImageClassifier())
