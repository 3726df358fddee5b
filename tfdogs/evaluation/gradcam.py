"""Class-activation heat maps: where in a photo a network found the breed it scores.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization", ICCV 2017: https://arxiv.org/abs/1610.02391)
weights each channel of the last convolutional stage by the mean gradient of
a class's logit over that channel, sums the weighted maps and keeps the
positive part. For the ResNets the stage is ``layer4`` (its last block's
output, 7 x 7 cells at 224 px); for LeNet-5 it is ``conv2``.

The coarse map is brought to image pixels through the stage's geometry (the
centre and spacing of its cells' receptive fields, walked from the input
through every convolution, pooling and padding), so a map of LeNet-5's
unpadded convolutions lands where its cells look, not stretched to the
borders.

Example:
    >>> explainer = Explainer(run.load_model())
    >>> maps = explainer.heat_maps(images, class_indices)  # [N, H, W] in [0, 1]
    >>> overlay(display_image(images[0], run.preprocessing), maps[0]).save("why.png")
"""

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from tfdogs import data, models

NO_CONVOLUTION_NOTE = ("This model has no convolutional layer, so it has no class-activation map: "
                       "every input pixel reaches every unit directly.")


def target_layer_name(model):
    """The layer whose output Grad-CAM explains, or None for a model without convolutions.

    The output of the last residual stage (``layer4``) where the model has
    stages, else the last `Conv2D`.
    """
    staged = [layer.name for layer in model.layers if models.stage_of(layer.name).startswith("layer")]
    if staged:
        last_stage = max(models.stage_of(name) for name in staged)
        return [name for name in staged if models.stage_of(name) == last_stage][-1]
    convolutions = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    return convolutions[-1] if convolutions else None


def cell_geometry(model, layer_name):
    """Where the cells of a layer's output sit on the input image, along one side.

    Receptive-field arithmetic along the main path (the first input of every
    layer, which for a residual `Add` is the convolution branch): each
    convolution or pooling with kernel k, stride s and left padding p moves
    the first cell's centre by ((k - 1) / 2 - p) input cells and multiplies
    the spacing by s.

    Returns:
        (centre of cell 0, spacing), in input pixels, pixel i spanning [i, i + 1).
    """
    chain, layer = [], model.get_layer(layer_name)
    while not isinstance(layer, keras.layers.InputLayer):
        chain.append(layer)
        node = layer._inbound_nodes[0]
        if not node.input_tensors:
            break
        layer = node.input_tensors[0]._keras_history.operation
    centre, spacing = 0.5, 1.0
    for layer in reversed(chain):
        if isinstance(layer, keras.layers.ZeroPadding2D):
            centre -= layer.padding[0][0] * spacing
            continue
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            kernel, stride, padding = layer.kernel_size[0], layer.strides[0], layer.padding
        elif isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
            kernel, stride, padding = layer.pool_size[0], layer.strides[0], layer.padding
        else:
            continue  # BatchNorm, activations, Add, Dropout: cell for cell
        left = (kernel - stride) // 2 if padding == "same" else 0  # TensorFlow puts the odd pixel at the end
        centre += ((kernel - 1) / 2 - left) * spacing
        spacing *= stride
    return centre, spacing


def _interpolation_matrix(cells, pixels, centre, spacing):
    """[pixels, cells]: linear interpolation between cell centres, edge values held beyond them."""
    positions = np.arange(pixels) + 0.5
    centres = centre + spacing * np.arange(cells)
    return np.stack([np.interp(positions, centres, unit) for unit in np.eye(cells)], axis=1)


class Explainer:
    """Grad-CAM heat maps of one Keras classifier (`has_maps` is False without convolutions).

    Args:
        model: a classifier returning logits (or temperature-scaled logits:
            the scale cancels in the normalised map).
        layer_name: the layer to explain; default `target_layer_name`.
    """

    def __init__(self, model, layer_name=None):
        self.model = model
        self.layer_name = layer_name or target_layer_name(model)
        self.has_maps = self.layer_name is not None
        if self.has_maps:
            self._features = keras.Model(model.inputs, [model.get_layer(self.layer_name).output, model.output])
            self._geometry = cell_geometry(model, self.layer_name)

    def coarse_maps(self, images, class_indices):
        """[N, cells, cells] float32 Grad-CAM of `class_indices` on normalised `images`, before upsampling."""
        images = tf.convert_to_tensor(images, tf.float32)
        with tf.GradientTape() as tape:
            features, logits = self._features(images, training=False)
            chosen = tf.gather(tf.cast(logits, tf.float32), np.asarray(class_indices, np.int64), batch_dims=1)
        # Gradients of the stage's own output (bfloat16 under mixed precision), then both in float32.
        gradients = tf.cast(tape.gradient(chosen, features), tf.float32)
        features = tf.cast(features, tf.float32)
        channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        return tf.nn.relu(tf.reduce_sum(channel_weights * features, axis=-1)).numpy()

    def heat_maps(self, images, class_indices):
        """[N, H, W] float32 maps in [0, 1] (each divided by its maximum; all zeros where none is positive).

        Args:
            images: [N, H, W, 3] normalised images, as the model takes them.
            class_indices: [N] the class each map explains (e.g. predicted, or true).
        """
        coarse = self.coarse_maps(images, class_indices)
        height, width = int(np.shape(images)[1]), int(np.shape(images)[2])
        rows = _interpolation_matrix(coarse.shape[1], height, *self._geometry)
        columns = _interpolation_matrix(coarse.shape[2], width, *self._geometry)
        maps = np.einsum("hi,nij,wj->nhw", rows, coarse, columns).astype(np.float32)
        peaks = maps.reshape(len(maps), -1).max(axis=1)
        return maps / np.where(peaks > 0, peaks, 1)[:, None, None]


def load_images(paths, preprocessing, batch_size=32):
    """[N, S, S, 3] normalised images through the evaluation pipeline (what the model sees)."""
    dataset = data.make_dataset([str(path) for path in paths], np.zeros(len(paths), np.int64), training=False,
                                batch_size=batch_size, **preprocessing.as_dict())
    return np.concatenate([images.numpy() for images, _ in dataset]) if len(paths) else np.zeros((0,))


def display_image(image, preprocessing):
    """uint8 [S, S, 3]: a normalised model input turned back into viewable pixels."""
    pixels = (np.asarray(image) * np.asarray(preprocessing.std) + np.asarray(preprocessing.mean)) * 255
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def overlay(pixels, heat_map, *, size=None, opacity=0.45):
    """The heat map in matplotlib's 'jet' colours over the image, as a Pillow RGB image.

    Args:
        pixels: uint8 [H, W, 3] image.
        heat_map: [H, W] in [0, 1].
        size: side of the square result (resized with bilinear filtering); default the image's.
        opacity: weight of the colours (0 shows only the photo).
    """
    import matplotlib  # only for the colour map: commands that draw no heat map need none

    colours = matplotlib.colormaps["jet"](np.clip(heat_map, 0, 1))[..., :3] * 255
    blended = (1 - opacity) * np.asarray(pixels, np.float32) + opacity * colours
    result = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    return result.resize((size, size), Image.BILINEAR) if size else result


def explain_paths(explainers, member_weights, paths, class_indices, preprocessings, *, size=224):
    """Overlays of each image's heat map for `class_indices`, averaged over models with `member_weights`.

    Each model sees the image through its own preprocessing; the maps are
    compared on the first model's grid (an ensemble's members may differ in
    input size). A model without convolutions contributes nothing.

    Returns:
        One Pillow image per path (None where no member has maps).
    """
    reference = preprocessings[0]
    total, combined = 0.0, None
    for explainer, weight, preprocessing in zip(explainers, member_weights, preprocessings):
        if not explainer.has_maps:
            continue
        maps = explainer.heat_maps(load_images(paths, preprocessing), class_indices)
        if preprocessing.image_size != reference.image_size:
            maps = tf.image.resize(maps[..., None], [reference.image_size] * 2).numpy()[..., 0]
        combined = weight * maps if combined is None else combined + weight * maps
        total += weight
    if combined is None:
        return [None] * len(paths)
    images = load_images(paths, reference)
    return [overlay(display_image(image, reference), heat_map / max(heat_map.max(), 1e-12), size=size)
            for image, heat_map in zip(images, combined / total)]
