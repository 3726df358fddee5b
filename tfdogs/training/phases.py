"""Training phases (head first, then the whole network) and what each freezes."""

import dataclasses
import types

import keras
import tensorflow as tf

from tfdogs import models

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of epochs with one set of frozen stages and per-stage rate factors."""

    name: str
    start_epoch: int
    end_epoch: int
    frozen_stages: tuple = ()
    stage_factors: dict = dataclasses.field(default_factory=dict)
    image_size: int | None = None  # None: the config's image_size


def plan_phases(config):
    """Turns the transfer strategy into training phases.

    scratch and discriminative train everything in one phase (discriminative
    with learning rates growing geometrically from `backbone_lr_factor` at the
    stem to 1 at the head); feature-extract trains only the head; fine-tune
    trains the head for `head_epochs`, then the whole network at
    `backbone_lr_factor` times the rate. With `finetune_image_size`, the last
    `finetune_epochs` epochs become a phase of their own at that size, with
    the settings of the phase they end (Touvron et al. 2019, "Fixing the
    train-test resolution discrepancy": a network trained on random crops
    sees objects larger than at evaluation, and a few epochs at a larger size
    close the gap).
    """
    phases = _strategy_phases(config)
    if not config.get("finetune_image_size"):
        return phases
    *earlier, last = phases
    start = config["epochs"] - config["finetune_epochs"]
    return [*earlier, dataclasses.replace(last, end_epoch=start),
            dataclasses.replace(last, name="large", start_epoch=start, image_size=config["finetune_image_size"])]


def _strategy_phases(config):
    epochs, factor = config["epochs"], config["backbone_lr_factor"]
    backbone = STAGES[:-1]
    strategy = config["strategy"]
    if strategy == "feature-extract":
        return [Phase("head", 0, epochs, frozen_stages=backbone)]
    if strategy == "fine-tune":
        head_epochs = config["head_epochs"]
        whole = Phase("all", head_epochs, epochs, stage_factors={stage: factor for stage in STAGES})
        return ([Phase("head", 0, head_epochs, frozen_stages=backbone)] if head_epochs else []) + [whole]
    if strategy == "discriminative":
        last = len(STAGES) - 1
        return [Phase("all", 0, epochs, stage_factors={
            stage: factor ** ((last - index) / last) for index, stage in enumerate(STAGES)})]
    return [Phase("all", 0, epochs)]


def _normalise_with_moving_statistics(layer, inputs, training=None, mask=None):
    """Inference: bfloat16 activations in one `FusedBatchNormV3` op, everything else as Keras does it.

    Keras casts bfloat16 activations to float32 and back around four separate
    ops; the fused kernel reads them as they are: a frozen ResNet-18
    backbone's pass over 288 photos at 224 px took 1.62 s, fused 1.34 s
    (AMD EPYC, 2 cores). float32 stays Keras' own (fused it gains 6 % and
    moves outputs by about 3e-6), so float32 runs equal `model.keras`.
    """
    if inputs.dtype != tf.bfloat16 or mask is not None or len(inputs.shape) != 4 or not _fusable(layer):
        return keras.layers.BatchNormalization.call(layer, inputs, training=False, mask=mask)
    outputs, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=tf.cast(layer.gamma, tf.float32), offset=tf.cast(layer.beta, tf.float32),
        mean=tf.cast(layer.moving_mean, tf.float32), variance=tf.cast(layer.moving_variance, tf.float32),
        epsilon=layer.epsilon, data_format="NHWC", is_training=False)
    return outputs


def _fusable(layer):
    return (layer.axis in (-1, 3, [-1], [3]) and layer.center and layer.scale and not layer.renorm
            and keras.backend.backend() == "tensorflow")


def _fused_training_step(layer, inputs, training=None, mask=None):
    """BatchNormalization's training branch as one `FusedBatchNormV3` op; everything else as Keras does it.

    Keras computes the batch moments and the normalisation as separate float32
    ops with casts around them (about a quarter of a bfloat16 ResNet-18 step
    on CPU); the fused kernel takes the bfloat16 activations directly. The
    moving statistics follow Keras' rule (momentum, biased variance).
    """
    if not (training and layer.trainable):  # inference, as Keras' layer when not training or not trainable
        return _normalise_with_moving_statistics(layer, inputs, mask=mask)
    if mask is not None or len(inputs.shape) != 4:
        return keras.layers.BatchNormalization.call(layer, inputs, training=training, mask=mask)
    outputs, mean, unbiased, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=tf.cast(layer.gamma, tf.float32), offset=tf.cast(layer.beta, tf.float32),
        mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32), epsilon=layer.epsilon,
        data_format="NHWC", is_training=True)
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = unbiased * (count - 1.0) / tf.maximum(count, 1.0)  # the kernel returns N / (N - 1) times it
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + tf.cast(mean, layer.moving_mean.dtype) * (1 - momentum))
    layer.moving_variance.assign(layer.moving_variance * momentum
                                 + tf.cast(variance, layer.moving_variance.dtype) * (1 - momentum))
    return outputs


def freeze_statistics(layer, frozen):
    """Makes a BatchNormalization layer normalise with its moving statistics, or with the batch's in one fused op.

    Frozen is what PyTorch's `bn.eval()` does during fine-tuning: the
    statistics stay as they are, gamma and beta still train. Keras'
    `trainable = False` would freeze gamma and beta too. Not frozen, the
    training step runs fused (`_fused_training_step`) where the layer allows
    it. Either way inference on bfloat16 activations is fused too
    (`_normalise_with_moving_statistics`), and the layer keeps its class, so
    its weights save and load under the same names and a model built anew
    (`model.keras`, the export) normalises as Keras does.
    """
    if frozen:
        layer.call = types.MethodType(_normalise_with_moving_statistics, layer)
    elif _fusable(layer):
        layer.call = types.MethodType(_fused_training_step, layer)
    else:
        vars(layer).pop("call", None)


def configure_phase(model, phase, freeze_bn):
    """Freezes the phase's stages (and BatchNorm statistics if asked); returns per-variable rate factors."""
    factors = {}
    for layer in model.layers:
        stage = models.stage_of(layer.name)
        layer.trainable = stage not in phase.frozen_stages
        if isinstance(layer, keras.layers.BatchNormalization):
            freeze_statistics(layer, freeze_bn)
        for variable in layer.trainable_weights:
            factors[variable.path] = phase.stage_factors.get(stage, 1.0)
    return factors
