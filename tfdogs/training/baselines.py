"""What a run's scores are read against: the ImageNet classifier's own zero-shot baseline, and ImageNet's overlap."""

import pathlib

from tfdogs import weights
from tfdogs.data.preprocessing import FILE_NAME as PREPROCESSING_FILE, Preprocessing
from tfdogs.evaluation.zeroshot import covered_breeds, evaluate_zero_shot

# Written into metrics.json beside the scores of every run that starts from pretrained weights.
IMAGENET_OVERLAP = (
    "The Kaggle dog-breed-identification and Stanford Dogs photos are ImageNet images, and ImageNet-pretrained "
    "weights like this run's may have been trained on some of its validation photos: its validation scores and "
    "the ImageNet zero-shot baseline may be higher than on dog photos from elsewhere.")


def zero_shot_baseline(config, records, val_indices, at_hand=None):
    """The untrained ImageNet classifier's scores on the run's validation split.

    Computed for runs starting from any checkpoint with a 1000-class ImageNet
    head (registry weights or a file) when at least two breeds of the data set
    are ImageNet classes (on their photos alone, see `evaluate_zero_shot`), with
    the run's own preprocessing record; None otherwise.

    Args:
        config: the run's config (its ``output`` holds the preprocessing record).
        records, val_indices: the photos and the validation split.
        at_hand: (validation features, ImageNet classifier) when the run's first, frozen pass
            computed the pretrained backbone's features of the validation photos with that
            record: the baseline is the classifier applied to them, and no network runs again.
    """
    features, classifier = at_hand or (None, None)
    # a classifier at hand is the checkpoint's ImageNet head, read once already: the file is not read again
    if classifier is None and not weights.imagenet_head(config["weights"], config["model"]):
        return None
    if len(covered_breeds(records.class_names)) < 2:
        return None
    preprocessing = Preprocessing.load(pathlib.Path(config["output"]) / PREPROCESSING_FILE)
    return evaluate_zero_shot(config["model"], records, val_indices, weights_source=config["weights"],
                              preprocessing=preprocessing, batch_size=config["batch_size"],
                              verbose=config["verbose"] != 0, features=features, imagenet_classifier=classifier)
