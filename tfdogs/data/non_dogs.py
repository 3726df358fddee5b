"""Real photos without a dog, from installed packages: what the "not a dog" check is measured on.

scikit-image ships sample photographs inside its wheel (`skimage.data`) and
matplotlib one portrait (`grace_hopper.jpg` in its sample data), so they are
there offline. They are photos, not drawings: a cat, people, a cup of coffee,
a rocket, a motorcycle, a clock, coins, the moon, galaxies, a retina,
stained tissue, text and three ground textures. Grayscale ones gain two
channels, as `data.decode_image` does for grayscale files. scikit-image is a
test dependency; without it these photos are not at hand, and
`non_dog_photos` says how to get them.
"""

import pathlib

import numpy as np

# (name in skimage.data, what the photo shows); stereo_motorcycle's left view alone, since its two
# views are nearly the same photo. Its drawings (logo, colorwheel, horse's silhouette) are left out.
SKIMAGE_PHOTOS = (
    ("astronaut", "astronaut Eileen Collins, a portrait"),
    ("chelsea", "Chelsea the cat"),
    ("coffee", "a cup of coffee"),
    ("rocket", "a rocket on its launch pad"),
    ("stereo_motorcycle", "a motorcycle"),
    ("camera", "a man with a camera (grayscale)"),
    ("clock", "a clock, blurred by motion (grayscale)"),
    ("coins", "Greek coins (grayscale)"),
    ("moon", "the moon's surface (grayscale)"),
    ("hubble_deep_field", "galaxies, the Hubble deep field"),
    ("retina", "a human retina"),
    ("immunohistochemistry", "stained tissue under a microscope"),
    ("cell", "a cell under a microscope (grayscale)"),
    ("page", "a printed page (grayscale)"),
    ("text", "painted text on a wall (grayscale)"),
    ("brick", "a brick wall (grayscale)"),
    ("grass", "grass (grayscale)"),
    ("gravel", "gravel (grayscale)"),
)
MATPLOTLIB_PHOTOS = (("grace_hopper.jpg", "Grace Hopper, a portrait"),)
INSTALL_HINT = "pip install scikit-image (its wheel ships the sample photos)"


def descriptions():
    """{photo name: what it shows}, in the order `non_dog_photos` returns them."""
    return {**{name: what for name, what in SKIMAGE_PHOTOS},
            **{pathlib.Path(name).stem: what for name, what in MATPLOTLIB_PHOTOS}}


def non_dog_photos():
    """{name: uint8 [h, w, 3] RGB}: every photo of `descriptions`.

    Raises:
        ModuleNotFoundError: scikit-image is not installed (the message says how to install it).
    """
    try:
        from skimage import data as samples  # a test dependency: only runs that measure rejection need it
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"The non-dog photos come with scikit-image: {INSTALL_HINT}.") from None
    import matplotlib
    from PIL import Image

    photos = {}
    for name, _ in SKIMAGE_PHOTOS:
        photo = getattr(samples, name)()
        photos[name] = _rgb(photo[0] if isinstance(photo, tuple) else photo)
    sample_data = pathlib.Path(matplotlib.get_data_path()) / "sample_data"
    for name, _ in MATPLOTLIB_PHOTOS:
        with Image.open(sample_data / name) as image:
            photos[pathlib.Path(name).stem] = np.asarray(image.convert("RGB"))
    return photos


def _rgb(photo):
    """uint8 [h, w, 3]: grayscale repeated over three channels, alpha dropped."""
    photo = np.asarray(photo)
    if photo.dtype != np.uint8:
        raise ValueError(f"Expected an 8-bit sample photo, got {photo.dtype}.")
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=-1)
    return np.ascontiguousarray(photo[..., :3])
