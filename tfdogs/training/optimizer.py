"""The learning-rate schedule and the per-variable optimizer (differential rates, decoupled weight decay)."""

import math

import keras
import tensorflow as tf


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up then cosine decay to zero over the whole run.

    `offset_steps` places a later phase's fresh optimizer (whose step counter
    starts at 0) at its position in the run-wide schedule.
    """

    def __init__(self, peak, total_steps, warmup_steps=0, offset_steps=0, decay=True):
        self.peak, self.total_steps = float(peak), int(total_steps)
        self.warmup_steps, self.offset_steps, self.decay = int(warmup_steps), int(offset_steps), decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + self.offset_steps
        warmup = tf.minimum(1.0, (step + 1.0) / max(self.warmup_steps, 1))
        if not self.decay:
            return self.peak * warmup
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * tf.clip_by_value(progress, 0.0, 1.0)))
        return self.peak * tf.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "offset_steps": self.offset_steps, "decay": self.decay}


# AdamW is Adam with decoupled weight decay, which `make_optimizer` applies itself for every optimizer.
OPTIMIZERS = {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}


def make_optimizer(name, learning_rate, momentum, variable_factors, weight_decay=0.0, ema=0.0):
    """An optimizer whose learning rate and weight decay are scaled per variable.

    Keras 3 has no MultiOptimizer; scaling the rate handed to `update_step`
    gives each variable its own rate with one optimizer, one step counter and
    one schedule. Weight decay is decoupled (w -= rate * factor *
    weight_decay * w before each update, as AdamW), so a variable trained at
    a tenth of the rate also decays at a tenth; Keras' own decay would use
    the global rate for every variable. Variables of rank 0 or 1 (biases,
    BatchNorm's gamma and beta) never decay.

    Args:
        name: "adam", "adamw" or "sgd".
        learning_rate: a float or a schedule.
        momentum: SGD momentum.
        variable_factors: maps `variable.path` to its rate factor (missing: 1).
        weight_decay: decoupled decay per unit of learning rate.
        ema: decay of the exponential moving average of the weights that
            the optimizer keeps (Keras' `use_ema`); 0 keeps none.
    """
    base = OPTIMIZERS[name]

    class PerVariableRate(base):
        def build(self, variables):
            super().build(variables)
            self.rate_factors = {}  # id of each form `update_step` may get a variable in -> its rate factor
            for variable in variables:
                for form in variable_forms(variable):
                    self.rate_factors[id(form)] = variable_factors.get(variable.path, 1.0)

        def update_step(self, gradient, variable, learning_rate):
            factor = self.rate_factors.get(id(variable))
            if factor is None:
                raise KeyError(f"The optimizer has no learning-rate factor for variable {variable.name!r}: "
                               "it was not among the variables it was built for.")
            rate = learning_rate * factor
            if weight_decay and len(variable.shape) > 1:
                variable.assign_sub(variable * tf.cast(rate * weight_decay, variable.dtype))
            return super().update_step(gradient, variable, rate)

    kwargs = {"momentum": momentum} if name == "sgd" else {}
    if ema:
        kwargs.update(use_ema=True, ema_momentum=ema)
    return PerVariableRate(learning_rate=learning_rate, **kwargs)


def variable_forms(variable):
    """A Keras variable as `update_step` may receive it: itself, the backend's variable it holds
    (TensorFlow's optimizer passes that), and under a distribution strategy each replica's copy."""
    backend_variable = variable.value if isinstance(variable.value, tf.Variable) else variable
    return [variable, backend_variable, *getattr(backend_variable, "values", ())]


def compile_model(model, config, learning_rate, factors, jit_compile):
    """Compiles a run's network: its optimizer, the loss and the metrics.

    The run's pipelines give one-hot labels (soft ones where MixUp or CutMix
    mix them), so the loss is categorical cross-entropy, with
    `label_smoothing` applied on top of any mixing; `log_loss` is the same
    cross-entropy without smoothing, the Kaggle score. The optimizer's
    variables are created here, for the model's trainable variables as they
    are now (the phase's), under the caller's distribution scope.
    """
    model.compile(
        optimizer=make_optimizer(config["optimizer"], learning_rate, config["momentum"], factors,
                                 config["weight_decay"], config["ema"]),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                 keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"),
                 keras.metrics.CategoricalCrossentropy(from_logits=True, name="log_loss")],
        jit_compile=jit_compile,
    )
    # Built now, eagerly: an optimizer that creates its variables inside the first training call makes
    # TensorFlow trace the whole training step twice (ResNet-18: about 2.5 s more before the first batch).
    model.optimizer.build(model.trainable_variables)
