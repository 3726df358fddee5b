"""A model's logits and probabilities over a dataset, and the calibrated model."""


import keras
import numpy as np
import tensorflow as tf

from tfdogs.data.decode import traced_as_written


def predict_logits(model, dataset, callbacks=()):
    """Logits (float32 numpy) of a classifier over a dataset of (images, labels); `callbacks` see each batch."""
    return np.asarray(model.predict(dataset.map(traced_as_written(lambda images, labels: images)), verbose=0,
                                    callbacks=list(callbacks)), np.float32)


def predict_probabilities(model, dataset, callbacks=()):
    """Softmax probabilities (float32 numpy) of a classifier over a dataset of (images, labels)."""
    return tf.nn.softmax(predict_logits(model, dataset, callbacks), axis=-1).numpy()


def with_temperature(model, temperature):
    """The model with its logits divided by a fitted temperature, as a final plain Keras layer.

    model.keras and the export hold it, so every later tool (evaluate,
    ensemble, predict, submit, TF Serving) gives calibrated probabilities.
    """
    scaled = keras.layers.Rescaling(1.0 / temperature, name="temperature")(model.output)
    return keras.Model(model.input, scaled, name=model.name)


def uncalibrated(model):
    """The model without the `temperature` layer `with_temperature` added (the model itself when it has none)."""
    if "temperature" not in [layer.name for layer in model.layers]:
        return model
    return keras.Model(model.input, model.get_layer("temperature").input, name=model.name)
