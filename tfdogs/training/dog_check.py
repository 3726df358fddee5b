"""The end of a run: set its "not a dog" threshold and measure it (`tfdogs.evaluation.not_a_dog`)."""

import numpy as np

from tfdogs import data
from tfdogs.data import non_dogs
from tfdogs.evaluation import not_a_dog
from tfdogs.training.features import can_cache, features_of_each, inference_of, split_at_features

FROM_RANDOM_WEIGHTS = ("it trained from random weights: features learned from its breeds alone cannot tell a dog "
                       "from anything else; start from pretrained weights (--weights) to get the check")
NO_POOLED_FEATURES = "its network has no pooled-features layer ('avgpool') to measure the distance on"


def fit_dog_check(config, model, train_dataset, val_dataset, train_labels, num_classes, preprocessing,
                  at_hand=(None, None, None), precision="float32"):
    """The run's `DogGate` and what it measured, or (None, why it cannot reject).

    The breed means come from the training photos' evaluation crops, the threshold from the
    validation photos (keeping 99 % of them); the real non-dog photos of `tfdogs.data.non_dogs`,
    when scikit-image is installed, measure how many non-dogs it lets through.

    Args:
        config: the run's config (``weights`` says whether it started from pretrained weights).
        model: the trained classifier, float32.
        train_dataset, val_dataset: (images, labels) batches of the training photos' evaluation crops
            and of the validation photos, in split order.
        train_labels: the training photos' class indices, in that order.
        num_classes: the number of breeds.
        preprocessing: the `Preprocessing` the export applies, for the non-dog photos.
        at_hand: (training features, validation features, folded backbone) that a frozen last phase
            already computed and ran (`inference_of` this model's backbone, in `precision`), each None
            where not: only the missing features run through the network, and the backbone is folded
            again only without one at hand.
        precision: the Keras dtype policy the run's frozen backbone runs in (its `frozen_precision`), and
            the at-hand features were computed in; the check computes the missing ones in it too
            (mixed_bfloat16 ran ResNet-18's folded backbone 4.3x faster than float32 on an AMX Xeon).

    Returns:
        (`not_a_dog.DogGate` or None, facts for `not_a_dog.json` and the export).
    """
    if config["weights"] is None:
        return None, {"can_reject": False, "why": FROM_RANDOM_WEIGHTS}
    if not can_cache(model):
        return None, {"can_reject": False, "why": NO_POOLED_FEATURES}
    *features_at_hand, backbone = at_hand
    if backbone is None:
        backbone = inference_of(split_at_features(model)[0], precision)
    missing = [dataset for dataset, features in zip((train_dataset, val_dataset), features_at_hand)
               if features is None]
    computed = iter(features for features, _ in (features_of_each(backbone, missing) if missing else []))
    train_features, val_features = (next(computed) if features is None else features
                                    for features in features_at_hand)
    gate = not_a_dog.fit(train_features, np.asarray(train_labels), val_features, num_classes)
    try:
        photos = non_dogs.non_dog_photos()
    except ModuleNotFoundError as error:
        return gate, {"can_reject": True, "precision": precision, **not_a_dog.rates(gate, val_features),
                      "non_dogs_missing": str(error)}
    pixels = np.stack([data.preprocess_eval(photo, **preprocessing.as_dict(), with_pillow=True).numpy()
                       for photo in photos.values()])
    facts = not_a_dog.rates(gate, val_features, backbone(pixels).numpy(), list(photos))
    return gate, {"can_reject": True, "precision": precision, **facts, "non_dog_photos": non_dogs.descriptions()}
