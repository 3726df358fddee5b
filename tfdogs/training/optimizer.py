"""The learning-rate schedules and the per-variable optimizer (differential rates, decoupled weight decay)."""

import math

import keras
import tensorflow as tf

from tfdogs.training import distillation


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


class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """fastai's one-cycle policy (`fit_one_cycle`; Smith 2018, https://arxiv.org/abs/1803.09820).

    Over the first `warmup_steps` of the run the rate rises from peak / 25 to
    the peak along half a cosine, then falls along another half cosine to
    peak / 1e5 at the end of the run; the momentum (Adam's beta_1, SGD's
    momentum) moves the other way, 0.95 -> 0.85 -> 0.95. At run step s the
    position is s / total_steps, as fastai's `ParamScheduler` places a batch.
    `offset_steps` places a later phase's fresh optimizer in the run, as in
    `WarmupCosine`.
    """

    START_DIVISOR, END_DIVISOR = 25.0, 1e5  # fastai's div and div_final
    MOMENTA = (0.95, 0.85, 0.95)  # fastai's moms

    def __init__(self, peak, total_steps, warmup_steps, offset_steps=0):
        self.peak, self.total_steps = float(peak), max(int(total_steps), 1)
        self.warmup_steps, self.offset_steps = int(warmup_steps), int(offset_steps)

    def __call__(self, step):
        return self._cycle(step, self.peak / self.START_DIVISOR, self.peak, self.peak / self.END_DIVISOR)

    def momentum(self, step):
        """The momentum at optimizer step `step` (a tensor): high while the rate is low."""
        return self._cycle(step, *self.MOMENTA)

    def _cycle(self, step, start, middle, end):
        position = tf.minimum((tf.cast(step, tf.float32) + self.offset_steps) / self.total_steps, 1.0)
        rise = self.warmup_steps / self.total_steps
        rising = position < rise
        progress = tf.where(rising, position / max(rise, 1e-12), (position - rise) / max(1.0 - rise, 1e-12))
        low, high = tf.where(rising, start, middle), tf.where(rising, middle, end)
        return low + (1.0 + tf.cos(math.pi * (1.0 - progress))) * (high - low) / 2.0

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "offset_steps": self.offset_steps}


# fastai's pct_start: the share of a one-cycle run spent rising to the peak when warmup_epochs is 0.
ONE_CYCLE_WARMUP_SHARE = 0.25


def make_schedule(config, peak, steps_per_epoch, start_epoch):
    """The run's schedule (config `schedule`) for a phase starting at `start_epoch`, at peak rate `peak`.

    cosine and constant: `WarmupCosine` (constant: the warm-up, then the
    peak). one-cycle: `OneCycle`, rising for `warmup_epochs`, or for a quarter
    of the run when that is 0.
    """
    total = config["epochs"] * steps_per_epoch
    if config["schedule"] == "one-cycle":
        rise = (config["warmup_epochs"] * steps_per_epoch if config["warmup_epochs"]
                else round(ONE_CYCLE_WARMUP_SHARE * total))
        return OneCycle(peak, total, min(rise, total), start_epoch * steps_per_epoch)
    return WarmupCosine(peak, total, config["warmup_epochs"] * steps_per_epoch, start_epoch * steps_per_epoch,
                        decay=config["schedule"] == "cosine")


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
        learning_rate: a float or a schedule; a schedule with a `momentum(step)`
            method (`OneCycle`) also sets Adam's beta_1 or SGD's momentum at
            each step, in place of `momentum`.
        momentum: SGD momentum.
        variable_factors: maps `variable.path` to its rate factor (missing: 1).
        weight_decay: decoupled decay per unit of learning rate.
        ema: decay of the exponential moving average of the weights that
            the optimizer keeps (Keras' `use_ema`); 0 keeps none.

    Adam and AdamW update each variable with TensorFlow's fused
    `ResourceApplyAdam` kernel, Keras' own formula (`keras.optimizers.Adam`:
    bias corrections folded into the rate, epsilon added to the square root
    of the second moment) in one pass over the variable and its two moments,
    where Keras' step runs a dozen ops. For ResNet-18 (62 variables, 11.2 M
    parameters) a step took 0.018 s against 0.029-0.032 s, its first call
    (tracing) 0.49-0.51 s against 1.06 s (`benchmarks/optimizer_step.py`,
    docs/performance.md). Under a distribution strategy each
    replica steps its own copies (the moments' `handle` is the replica's).
    """
    base = OPTIMIZERS[name]
    cycled = getattr(learning_rate, "momentum", None)

    class PerVariableRate(base):
        def build(self, variables):
            super().build(variables)
            # id of each form `update_step` may get a variable in -> (its rate factor, its optimizer slots)
            self.per_variable = {}
            for variable, slots in zip(variables, optimizer_slots(self, name, variables)):
                for form in variable_forms(variable):
                    self.per_variable[id(form)] = (variable_factors.get(variable.path, 1.0), slots)

        def update_step(self, gradient, variable, learning_rate):
            factor, slots = self.per_variable.get(id(variable), (None, None))
            if factor is None:
                raise KeyError(f"The optimizer has no learning-rate factor for variable {variable.name!r}: "
                               "it was not among the variables it was built for.")
            rate = learning_rate * factor
            if weight_decay and len(variable.shape) > 1:
                variable.assign_sub(variable * tf.cast(rate * weight_decay, variable.dtype))
            if name != "sgd":  # Adam and AdamW, with this step's beta_1 where the schedule cycles it
                beta_1 = self.beta_1 if cycled is None else cycled(self.iterations)
                return fused_adam_step(self, gradient, variable, rate, beta_1, *slots)
            if cycled is None:
                return super().update_step(gradient, variable, rate)
            # Keras' SGD tests its momentum against 0 in Python: its (non-Nesterov) step here
            velocity, = slots
            self.assign(velocity, velocity * tf.cast(cycled(self.iterations), variable.dtype)
                        - tf.cast(gradient, variable.dtype) * tf.cast(rate, variable.dtype))
            return self.assign_add(variable, velocity)

    # A cycled SGD momentum needs the momentum slots, which Keras creates only for a non-zero momentum.
    kwargs = {"momentum": OneCycle.MOMENTA[0] if cycled else momentum} if name == "sgd" else {}
    if ema:
        kwargs.update(use_ema=True, ema_momentum=ema)
    return PerVariableRate(learning_rate=learning_rate, **kwargs)


def optimizer_slots(optimizer, name, variables):
    """Per variable, in `variables`' order: Adam's (first moment, second moment); SGD's (velocity,) or ().

    Keras keeps Adam's moments under private names (`_momentums`,
    `_velocities`, one per variable in the order `build` got them): read
    once here, guarded by tests/test_keras_internals.py. SGD's are public
    (`momentums`, created only for a non-zero momentum).
    """
    if name == "sgd":
        return [(velocity,) for velocity in optimizer.momentums] if optimizer.momentums else [()] * len(variables)
    return list(zip(optimizer._momentums, optimizer._velocities))


def fused_adam_step(optimizer, gradient, variable, rate, beta_1, first_moment, second_moment):
    """Keras' Adam step for one variable as TensorFlow's single `ResourceApplyAdam` kernel.

    The kernel computes what `keras.optimizers.Adam.update_step` does, in the
    same order: rate * sqrt(1 - beta_2^t) / (1 - beta_1^t), the moments moved
    towards the gradient and its square, the variable moved by the first
    moment over (sqrt(second) + epsilon).
    """
    dtype = variable.dtype
    step = tf.cast(optimizer.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
    return tf.raw_ops.ResourceApplyAdam(
        var=backend_variable(variable).handle, m=backend_variable(first_moment).handle,
        v=backend_variable(second_moment).handle,
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(rate, dtype),
        beta1=beta_1, beta2=beta_2, epsilon=tf.cast(optimizer.epsilon, dtype), grad=tf.cast(gradient, dtype))


def backend_variable(variable):
    """The `tf.Variable` behind a Keras variable (or the variable itself)."""
    return variable.value if isinstance(variable.value, tf.Variable) else variable


def variable_forms(variable):
    """A Keras variable as `update_step` may receive it: itself, the backend's variable it holds
    (TensorFlow's optimizer passes that), and under a distribution strategy each replica's copy."""
    backend = backend_variable(variable)
    return [variable, backend, *getattr(backend, "values", ())]


def compile_model(model, config, learning_rate, factors, jit_compile):
    """Compiles a run's network: its optimizer, the loss and the metrics.

    The run's pipelines give one-hot labels (soft ones where MixUp or CutMix
    mix them), so the loss is categorical cross-entropy, with
    `label_smoothing` applied on top of any mixing; `log_loss` is the same
    cross-entropy without smoothing, the Kaggle score (`training_loss`). The optimizer's
    variables are created here, for the model's trainable variables as they
    are now (the phase's), under the caller's distribution scope.
    """
    model.compile(
        optimizer=make_optimizer(config["optimizer"], learning_rate, config["momentum"], factors,
                                 config["weight_decay"], config["ema"]),
        loss=training_loss(config),
        metrics=distillation.distillation_metrics() if config["teacher"] else [
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"),
            keras.metrics.CategoricalCrossentropy(from_logits=True, name="log_loss")],
        jit_compile=jit_compile,
    )
    # Built now, eagerly: an optimizer that creates its variables inside the first training call makes
    # TensorFlow trace the whole training step twice (ResNet-18: about 2.5 s more before the first batch).
    model.optimizer.build(model.trainable_variables)


def training_loss(config):
    """The loss a run trains on: categorical cross-entropy of the logits, with the config's label smoothing.

    With config ``teacher``, `distillation.DistillationLoss` (the same cross-entropy on validation batches).
    """
    if config["teacher"]:
        return distillation.DistillationLoss(config["distill_temperature"], config["distill_alpha"],
                                             config["label_smoothing"])
    return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config["label_smoothing"])
