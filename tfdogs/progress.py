"""Progress bars for the long steps over photos: Keras's own `keras.utils.Progbar`, where someone watches.

The data check, the zero-shot baseline, evaluation, predict, submit and the
Stanford Dogs export take minutes over a full data set. Each shows a bar with
the count and an estimate of the time left, but only when it handles at least
`MIN_PHOTOS` photos, its `verbose` is not 0, and stdout is a terminal (a log
file or a pipe gets no carriage-return noise).

Example:
    bar = progress.photos(len(paths), verbose=1)
    for batch in batches:
        ...
        bar.add(len(batch))
"""

import sys

import keras

# Fewer photos take seconds: no bar.
MIN_PHOTOS = 300


class _Silent:
    """Stands in for a bar that is not shown."""

    def add(self, count, values=None):
        pass

    def update(self, current, values=None, finalize=None):
        pass


def photos(total, verbose=1):
    """A progress bar over `total` photos, or a silent stand-in with the same `add` and `update`.

    Args:
        total: How many photos the work handles.
        verbose: 0 shows nothing; anything else shows the bar on a terminal.

    Returns:
        A `keras.utils.Progbar` (unit "photo") or an object whose methods do nothing.
    """
    if not verbose or total < MIN_PHOTOS or not _on_terminal():
        return _Silent()
    return keras.utils.Progbar(total, unit_name="photo")


def _on_terminal():
    return sys.stdout.isatty()


class PredictCallback(keras.callbacks.Callback):
    """Advances a bar over photos as `Model.predict` finishes each batch."""

    def __init__(self, bar, total, batch_size):
        super().__init__()
        self.bar, self.total, self.batch_size = bar, total, batch_size

    def on_predict_batch_end(self, batch, logs=None):
        self.bar.update(min(self.total, (batch + 1) * self.batch_size))
