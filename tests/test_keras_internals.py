"""The private Keras and TensorFlow names tfdogs still uses (docs/keras-internals.md), each guarded.

One small test per name: it fails with the Keras/TensorFlow versions and the
name when the name disappears or no longer behaves as tfdogs uses it, so an
upgrade past the pinned Keras 3.15 says what to rework instead of failing
deep inside a run.
"""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

VERSIONS = f"Keras {keras.__version__}, TensorFlow {tf.__version__}"


def changed(name, what):
    return f"{VERSIONS}: {name} {what}; tfdogs relies on it (docs/keras-internals.md lists where and why)."


def require(condition, name, what):
    if not condition:
        pytest.fail(changed(name, what))


def has_parameters(function, *names):
    return all(name in inspect.signature(function).parameters for name in names)


def small_model(dropout=0.5):
    inputs = keras.Input((4,))
    hidden = keras.Sequential([keras.layers.Dense(8), keras.layers.Dropout(dropout)], name="block")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))


# ----------------------------------------------------------------------------- tfdogs/training/optimizer.py


def test_adam_momentums_and_velocities_are_the_moments_its_step_moves_in_build_order():
    name = "keras.optimizers.Adam._momentums / _velocities"
    variables = [keras.Variable(np.ones((2, 3), np.float32), name="a"), keras.Variable(np.ones(4, np.float32), name="b")]
    optimizer = keras.optimizers.Adam(0.1)
    optimizer.build(variables)
    require(all(hasattr(optimizer, attribute) for attribute in ("_momentums", "_velocities")), name, "are gone")
    require([tuple(m.shape) for m in optimizer._momentums] == [(2, 3), (4,)]
            and [tuple(v.shape) for v in optimizer._velocities] == [(2, 3), (4,)], name,
            "no longer hold one slot per variable in the order build got them")
    gradients = [np.full((2, 3), 2.0, np.float32), np.full(4, -1.0, np.float32)]
    optimizer.apply_gradients(zip(gradients, variables))
    for gradient, m, v in zip(gradients, optimizer._momentums, optimizer._velocities):  # Keras' own step
        require(np.allclose(m.numpy(), 0.1 * gradient) and np.allclose(v.numpy(), 0.001 * gradient ** 2), name,
                "are no longer the first and second moments Adam's step moves")


# ----------------------------------------------------------------------------- tfdogs/training/callbacks.py


def test_swap_ema_weights_swap_variables_exchanges_the_weights_and_their_average():
    name = "keras.callbacks.SwapEMAWeights._swap_variables"
    require(hasattr(keras.callbacks.SwapEMAWeights, "_swap_variables"), name, "is gone")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5), loss="mse")
    x, y = np.ones((4, 2), np.float32), np.zeros((4, 1), np.float32)
    after_steps = []
    for _ in range(2):
        model.train_on_batch(x, y)
        after_steps.append(model.get_weights()[0].copy())
    average = after_steps[0] * 0.5 + after_steps[1] * 0.5  # Keras' rule: the first step's weights, then the mix
    swap = keras.callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap._swap_variables()
    require(np.allclose(model.get_weights()[0], average, atol=1e-6), name, "no longer puts the average in the model")
    swap._swap_variables()
    # by additions (a += b; b = a - b; a -= b), as around every validation: back to float rounding
    require(np.allclose(model.get_weights()[0], after_steps[1], atol=1e-6), name,
            "no longer swaps the raw weights back")


def test_flatten_layers_and_seed_generators_reach_a_nested_dropout():
    model = small_model()
    require(hasattr(model, "_flatten_layers"), "Layer._flatten_layers", "is gone")
    layers = list(model._flatten_layers())
    require(any(isinstance(layer, keras.layers.Dropout) for layer in layers), "Layer._flatten_layers",
            "no longer walks into nested models")
    generators = [generator for layer in layers for generator in getattr(layer, "_seed_generators", ())]
    require(len(generators) == 1 and isinstance(generators[0], keras.random.SeedGenerator),
            "Layer._seed_generators", "no longer lists a Dropout's SeedGenerator")
    require(tuple(generators[0].state.shape) == (2,), "SeedGenerator.state", "is no longer a [2] variable")
    x = np.ones((2, 4), np.float32)
    masks = []
    for _ in range(2):
        generators[0].state.assign(tf.constant([7, 0], generators[0].state.dtype))
        masks.append(model(x, training=True).numpy())
    require(np.array_equal(*masks), "Layer._seed_generators", "state no longer decides the dropout mask")


def test_maybe_symbolic_build_and_symbolic_build_are_what_fit_calls():
    model = small_model(dropout=0.0)
    model.compile(optimizer="sgd", loss="mse")
    for name, parameters in (("_maybe_symbolic_build", ("iterator", "data_batch")),
                             ("_symbolic_build", ("data_batch",))):
        require(hasattr(model, name) and has_parameters(getattr(model, name), *parameters), f"Trainer.{name}",
                f"is gone or no longer takes {parameters}")
    calls = []
    own = model._maybe_symbolic_build

    def recording(iterator=None, data_batch=None):
        calls.append(iterator is not None)
        own(iterator=iterator, data_batch=data_batch)

    model._maybe_symbolic_build = recording
    model.fit(np.ones((4, 4), np.float32), np.ones((4, 3), np.float32), epochs=1, verbose=0)
    require(calls and calls[0], "Trainer._maybe_symbolic_build", "is no longer called by fit with the iterator")


# ----------------------------------------------------------------------------- tfdogs/files.py


def test_saving_lib_reads_its_skipset_under_the_name_tfdogs_stores_it():
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving import saving_lib
    except ImportError as error:
        pytest.fail(changed("keras.src.backend.common.global_state / keras.src.saving.saving_lib", f"({error})"))
    name = "keras.src.saving.saving_lib.get_attr_skipset"
    require(has_parameters(saving_lib.get_attr_skipset, "obj_type"), name, "no longer takes obj_type")
    key = "saving_attr_skiplist_Layer"
    kept = global_state.get_global_attribute(key)
    sentinel = {"tfdogs-sentinel"}
    global_state.set_global_attribute(key, sentinel)
    try:
        require(saving_lib.get_attr_skipset("Layer") is sentinel, name,
                f"no longer reads global_state's '{key}'")
    finally:
        global_state.set_global_attribute(key, kept)


# ----------------------------------------------------------------------------- tfdogs/evaluation/gradcam.py, serving/fold.py


def test_inbound_nodes_keras_history_and_outbound_nodes_walk_a_functional_model():
    inputs = keras.Input((8, 8, 3))
    convolution = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")
    normalisation = keras.layers.BatchNormalization(name="bn")
    model = keras.Model(inputs, normalisation(convolution(inputs)))
    layer = model.get_layer("bn")
    require(hasattr(layer, "_inbound_nodes") and layer._inbound_nodes, "Layer._inbound_nodes", "is gone or empty")
    producer = layer._inbound_nodes[0].input_tensors[0]._keras_history.operation
    require(producer is convolution, "Node.input_tensors[0]._keras_history.operation",
            "no longer names the layer that made the tensor")
    require(layer.input._keras_history.operation is convolution, "KerasTensor._keras_history",
            "no longer names the layer that made layer.input")
    require(len(convolution._outbound_nodes) == 1, "Layer._outbound_nodes", "no longer counts a layer's consumers")


# ----------------------------------------------------------------------------- tfdogs/data/augment.py


class CountingSeed(keras.random.SeedGenerator):
    """A stand-in generator, as augment's: counts the draws made through it."""

    def __init__(self):  # no state variable, as tfdogs' stand-in
        self.draws = 0

    def next(self, ordered=True):
        self.draws += 1
        return tf.constant([1, self.draws], tf.int32)


@pytest.mark.parametrize("make_layer", [lambda: keras.layers.RandAugment(value_range=(0, 255), seed=1),
                                        lambda: keras.layers.AugMix(value_range=(0, 255), seed=1)],
                         ids=["RandAugment", "AugMix"])
def test_augmentation_layers_draw_through_their_generator_attribute(make_layer):
    layer = make_layer()
    name = f"{type(layer).__name__}.generator"
    require(isinstance(getattr(layer, "generator", None), keras.random.SeedGenerator), name,
            "is no longer the layer's SeedGenerator")
    stand_in = CountingSeed()
    object.__setattr__(layer, "generator", stand_in)  # as tfdogs.data.augment swaps it, past Keras' tracking
    images = tf.random.stateless_uniform((2, 16, 16, 3), [0, 1], maxval=255.0)
    transformation = layer.get_random_transformation(images, training=True, seed=CountingSeed())
    layer.transform_images(images, transformation, training=True)
    require(layer.generator is stand_in, name, "cannot be replaced past Keras' tracking")
    require(stand_in.draws > 0, name, "is no longer drawn from when a seed is given: the swap may have become "
            "unneeded (augment_batch's fixed seeds would still be used), check and update docs/keras-internals.md")


class RecordingImageBackend:
    """Stands in for a layer's backend: records the transforms its `image.affine_transform` is given."""

    def __init__(self, backend):
        self._backend, self.transforms = backend, []
        self.image = self

    def affine_transform(self, images, transform, **options):
        self.transforms.append(transform)
        return self._backend.image.affine_transform(images, transform, **options)

    def __getattr__(self, name):
        return getattr(self._backend, name)


@pytest.mark.parametrize("make_layer", [lambda: keras.layers.RandomRotation(0.05, seed=1),
                                        lambda: keras.layers.RandomZoom(0.1, seed=1),
                                        lambda: keras.layers.RandomTranslation(0.1, 0.1, seed=1)],
                         ids=["RandomRotation", "RandomZoom", "RandomTranslation"])
def test_resampling_layers_transform_through_their_backend_attribute(make_layer):
    layer = make_layer()
    name = f"{type(layer).__name__}.backend.image.affine_transform"
    require(hasattr(getattr(layer, "backend", None), "image"), name, "is gone: the layer has no backend attribute")
    recording = RecordingImageBackend(layer.backend)
    object.__setattr__(layer, "backend", recording)  # as tfdogs.data.augment swaps it, past Keras' tracking
    images = tf.random.stateless_uniform((2, 16, 16, 3), [0, 1], maxval=255.0)
    transformation = layer.get_random_transformation(images, training=True, seed=CountingSeed())
    output = layer.transform_images(images, transformation, training=True)
    require(layer.backend is recording, name, "cannot be replaced past Keras' tracking")
    require(len(recording.transforms) == 1 and tuple(recording.transforms[0].shape) == (2, 8), name,
            "is no longer how the layer resamples (once, with a [batch, 8] transform): augment_batch's "
            "compiled resampling would silently stop being used; check and update docs/keras-internals.md")
    expected = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.cast(recording.transforms[0], tf.float32), output_shape=[16, 16],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    require(np.array_equal(output.numpy(), expected.numpy()), name,
            "no longer resamples bilinearly with reflected borders, the case tfdogs.data.resample compiles")


# ----------------------------------------------------------------------------- tfdogs/training/cluster.py


def test_eager_context_coordination_service_calls_and_coordination_config():
    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
        from tensorflow.python.eager import context
    except ImportError as error:
        pytest.fail(changed("tensorflow.python.eager.context / tensorflow.compiler.xla.tsl.protobuf", f"({error})"))
    job = coordination_config_pb2.CoordinatedJob(name="worker", num_tasks=2)
    require(job.name == "worker" and job.num_tasks == 2, "coordination_config_pb2.CoordinatedJob",
            "no longer has name and num_tasks")
    eager = context.context()
    for method, parameters in (
            ("configure_coordination_service", ("service_type", "service_leader", "coordinated_jobs",
                                                "cluster_register_timeout_in_ms",
                                                "allow_new_incarnation_to_reconnect")),
            ("set_config_key_value", ("key", "value")),
            ("get_config_key_value", ("key", "timeout_in_ms")),
            ("report_error_to_cluster", ("error_code", "error_message"))):
        require(hasattr(eager, method) and has_parameters(getattr(eager, method), *parameters),
                f"tensorflow.python.eager.context.Context.{method}", f"is gone or no longer takes {parameters}")
