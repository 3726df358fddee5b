"""The learning-rate sweep: a model trained briefly at exponentially growing rates, loss recorded per batch.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks",
https://arxiv.org/abs/1506.01186) and fastai's `lr_find`: the rate grows
from `start_rate` to `end_rate` by the same factor each step, the batch's
loss is smoothed by a debiased moving average (beta 0.98), and the sweep
stops once the smoothed loss exceeds 4 times its lowest value (or a loss is
not finite). The model, its optimizer's state and the process' random state
are put back afterwards (`left_as_found`), so training can follow in the same
process as if the sweep never ran.
"""

import contextlib
import dataclasses
import random

import keras
import numpy as np
import tensorflow as tf

SMOOTHING = 0.98  # fastai's AvgSmoothLoss beta
DIVERGENCE = 4.0  # stop when the smoothed loss exceeds this many times its lowest value (fastai's rule)
# fastai's suggestions read the curve without its first tenth of steps (the debiased average still settling)
# and its last five (the blow-up).
SKIP_START_SHARE, SKIP_END = 0.1, 5


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The rates tried: `steps` of them from `start_rate` to `end_rate`, each `growth` times the last."""

    start_rate: float = 1e-7
    end_rate: float = 10.0
    steps: int = 100

    def __post_init__(self):
        if not 0 < self.start_rate < self.end_rate:
            raise ValueError(f"A sweep needs 0 < start rate < end rate, got {self.start_rate} and {self.end_rate}.")
        if self.steps < 2:
            raise ValueError(f"A sweep needs at least 2 steps, got {self.steps}.")

    @property
    def growth(self):
        return (self.end_rate / self.start_rate) ** (1.0 / (self.steps - 1))

    def rates(self):
        """Every step's rate: start * growth ** step, the last one `end_rate`."""
        return self.start_rate * self.growth ** np.arange(self.steps, dtype=np.float64)


class ExponentialRate(keras.optimizers.schedules.LearningRateSchedule):
    """`Sweep.rates` as a Keras schedule of the optimizer's step (held at `end_rate` after the last step)."""

    def __init__(self, start_rate, end_rate, steps):
        self.start_rate, self.end_rate, self.steps = float(start_rate), float(end_rate), int(steps)

    def __call__(self, step):
        progress = tf.minimum(tf.cast(step, tf.float32), self.steps - 1) / (self.steps - 1)
        return self.start_rate * (self.end_rate / self.start_rate) ** progress

    def get_config(self):
        return {"start_rate": self.start_rate, "end_rate": self.end_rate, "steps": self.steps}


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """The rates the curve suggests, and the steps of the curve they were read from."""

    steepest: float  # where the smoothed loss falls fastest against log(rate)
    minimum: float  # where the smoothed loss is lowest (fastai suggests a tenth of it)
    first_step: int
    last_step: int

    def describe(self):
        return (f"suggested learning rate {self.steepest:.3g}: the steepest descent of the smoothed loss against "
                f"log(rate), steps {self.first_step}-{self.last_step}; a tenth of the minimum's rate: "
                f"{self.minimum / 10:.3g} (minimum at {self.minimum:.3g})")


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Per step run: the rate, the batch's loss and the smoothed loss; and why the sweep ended."""

    rates: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stopped: str

    def suggestion(self):
        return suggest(self.rates, self.smoothed)


def smooth(losses, beta=SMOOTHING):
    """fastai's debiased exponential average: average_i = beta * average_(i-1) + (1 - beta) * loss_i, divided by
    1 - beta ** (i + 1)."""
    average, smoothed = 0.0, []
    for index, loss in enumerate(losses):
        average = beta * average + (1 - beta) * float(loss)
        smoothed.append(average / (1 - beta ** (index + 1)))
    return np.asarray(smoothed, np.float64)


def diverged(smoothed, loss):
    """fastai's stopping rule on the latest step: a non-finite loss, or the smoothed loss over 4x its lowest."""
    return not np.isfinite(loss) or smoothed[-1] > DIVERGENCE * smoothed.min()


def suggest(rates, smoothed):
    """The steepest descent and the minimum of the smoothed loss, read without the first tenth of the steps and
    the last five (fastai's window), or over every step when that leaves fewer than 3.

    Raises:
        ValueError: with fewer than 2 steps to read.
    """
    rates, smoothed = np.asarray(rates, np.float64), np.asarray(smoothed, np.float64)
    first, last = int(len(rates) * SKIP_START_SHARE), len(rates) - SKIP_END
    if last - first < 3:
        first, last = 0, len(rates)
    if last - first < 2:
        raise ValueError(f"The sweep ran {len(rates)} step(s); a suggestion needs at least 2.")
    window_rates, window_losses = rates[first:last], smoothed[first:last]
    slopes = np.diff(window_losses) / np.diff(np.log(window_rates))
    return Suggestion(steepest=float(window_rates[int(np.argmin(slopes))]),
                      minimum=float(window_rates[int(np.argmin(window_losses))]),
                      first_step=first, last_step=last - 1)


@contextlib.contextmanager
def left_as_found(model):
    """Puts back, on leaving, what a sweep changes: every variable of `model` (weights, BatchNorm statistics,
    dropout seed states), each layer's `trainable` and any per-instance `call` (`phases.freeze_statistics`),
    Python's and NumPy's random states and Keras' global dtype policy.

    The model's compiled optimizer, if any, is never touched: the sweep brings its own.
    """
    values = [variable.numpy() for variable in model.variables]
    layers = [(layer, layer.trainable, vars(layer).get("call")) for layer in all_layers(model)]
    try:
        with process_state_kept():
            yield
    finally:
        for layer, trainable, call in layers:
            layer.trainable = trainable
            if call is None:
                vars(layer).pop("call", None)
            else:
                layer.call = call
        for variable, value in zip(model.variables, values):
            variable.assign(value)


@contextlib.contextmanager
def process_state_kept():
    """Puts back Python's and NumPy's random states and Keras' global dtype policy on leaving."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    policy = keras.mixed_precision.global_policy()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        keras.mixed_precision.set_dtype_policy(policy)


def all_layers(model):
    """`model`'s layers and those of the models nested in it, depth first."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from all_layers(layer)


def training_step(model, optimizer, loss_function, jit_compile=False):
    """One compiled step as Keras' `fit` takes it: the loss (plus the model's regularisation) of a batch under
    training=True, its gradients to the trainable variables, the optimizer's update. Returns the loss."""

    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_function(labels, tf.cast(logits, tf.float32))
            if model.losses:
                loss += tf.add_n([tf.cast(penalty, tf.float32) for penalty in model.losses])
            scaled = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    return tf.function(step, jit_compile=jit_compile)


def sweep_rates(model, batches, optimizer, loss_function, sweep, jit_compile=False):
    """Trains `model` one batch per rate of `sweep`, recording each batch's loss, until the sweep ends or diverges.

    The caller sets which variables train (`phases.configure_phase`) and gives
    an optimizer built with `ExponentialRate(sweep...)` as its rate; nothing
    is put back here (see `left_as_found`).

    Args:
        model: a Keras model.
        batches: an iterable of (images, labels) with at least `sweep.steps` batches.
        optimizer: a fresh Keras optimizer whose rate is the sweep's schedule.
        loss_function: (labels, logits) -> mean loss.
        sweep: the `Sweep`.
        jit_compile: compile the step with XLA.

    Returns:
        A `SweepResult`.
    """
    optimizer.build(model.trainable_variables)
    step = training_step(model, optimizer, loss_function, jit_compile)
    planned, losses, stopped = sweep.rates(), [], f"all {sweep.steps} steps ran"
    for index, (images, labels) in enumerate(batches):
        if index == sweep.steps:
            break
        losses.append(float(step(images, labels)))
        smoothed = smooth(losses)
        if diverged(smoothed, losses[-1]):
            stopped = (f"stopped at step {index + 1} of {sweep.steps}: "
                       + (f"the loss was {losses[-1]}" if not np.isfinite(losses[-1]) else
                          f"the smoothed loss {smoothed[-1]:.4g} exceeded {DIVERGENCE:g} times its lowest, "
                          f"{smoothed.min():.4g}"))
            break
    else:
        if len(losses) < sweep.steps:
            stopped = f"the training photos gave only {len(losses)} of {sweep.steps} batches"
    return SweepResult(rates=planned[:len(losses)], losses=np.asarray(losses), smoothed=smooth(losses),
                       stopped=stopped)
