"""Dog photos from disk to batches: layouts, synthetic data, splits, image ops and the tf.data pipeline.

Modules, in the order the data flows:
    layouts: the Kaggle folder and class folders read into `Records` (bad files as `Problem`s).
    synthetic, stanford_dogs: a learnable stand-in, and Stanford Dogs through TensorFlow Datasets.
    splits: the stratified, seeded split and `split.csv`.
    image: decode, EXIF orientation and the evaluation crop, shared with serving.
    preprocessing: the `Preprocessing` record that travels with the weights.
    augment, pipeline: Keras preprocessing-layer augmentation and `make_dataset`.
    breeds: the 120 Kaggle breeds and their ImageNet classes.

Typical use:

    records = find_records("data/dog-breed-identification")
    train_indices, val_indices = stratified_split(records.labels, val_fraction=0.2)
    train_dataset = make_dataset(
        [records.paths[i] for i in train_indices], records.labels[train_indices],
        image_size=224, batch_size=64, training=True,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
"""

from tfdogs.data.decode import decode_image, exif_orientation, traced_as_written
from tfdogs.data.image import TTA_VIEWS, eval_views, preprocess_eval
from tfdogs.data.layouts import (
                                 IMAGE_EXTENSIONS,
                                 LAYOUTS_HELP,
                                 DataError,
                                 Problem,
                                 Records,
                                 find_records,
                                 images_in,
                                 scan_records,
)
from tfdogs.data.pipeline import make_dataset, random_crop_bytes, random_crop_image
from tfdogs.data.splits import (read_data_source, read_split, split_digests, stratified_folds, stratified_split,
                                 write_data_source, write_split)
from tfdogs.data.stanford_dogs import export_to_class_folders, load_stanford_dogs
from tfdogs.data.synthetic import make_synthetic, synthetic_image

__all__ = ["IMAGE_EXTENSIONS", "LAYOUTS_HELP", "TTA_VIEWS", "DataError", "Problem", "Records",
           "decode_image", "eval_views", "exif_orientation", "export_to_class_folders", "find_records",
           "images_in", "load_stanford_dogs", "make_dataset", "make_synthetic", "preprocess_eval",
           "random_crop_bytes", "random_crop_image", "read_data_source", "read_split", "scan_records",
           "split_digests", "stratified_folds", "stratified_split", "synthetic_image", "traced_as_written",
           "write_data_source", "write_split"]
