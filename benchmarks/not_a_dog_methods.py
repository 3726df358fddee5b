"""Which "is it a dog" score keeps 99 % of a run's dog photos and lets the fewest real non-dog photos through?

Compares, on a finished run from ImageNet weights, four scores of each photo
(its evaluation crop), each with the threshold that keeps 99 % of the run's
validation photos:

    imagenet_dog_mass_run        the ImageNet head's probability mass on its 118 dog classes,
                                 on the run's own (perhaps fine-tuned) backbone
    imagenet_dog_mass_pretrained the same on the untouched pretrained backbone (a second network)
    top_breed_probability        the breed head's highest softmax probability
    nearest_breed_cosine         cosine similarity of the pooled features to the nearest breed's
                                 mean training feature (what tfdogs ships)

and prints, per score, the threshold, the share of validation and training
dog photos below it, and how many of the non-dog photos of
`tfdogs.data.non_dogs` reach it. docs/serving.md ("Not a dog") has the results.

Example:
    python benchmarks/not_a_dog_methods.py runs/efficientnet_lite0-demo
"""

import argparse
import json

import numpy as np
import tensorflow as tf
from PIL import Image

from tfdogs import data, weights
from tfdogs.data import breeds, non_dogs
from tfdogs.evaluation import not_a_dog
from tfdogs.runs.folder import load_run
from tfdogs.training.features import split_at_features


def evaluation_pixels(images, record):
    return np.stack([data.preprocess_eval(tf.constant(image), **record.as_dict()).numpy() for image in images])


def photos_of(paths):
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run folder trained from ImageNet weights")
    args = parser.parse_args(argv)
    run = load_run(args.run)
    records, train_indices, val_indices = run.split()
    photos = non_dogs.non_dog_photos()
    pixels = {"val": evaluation_pixels(photos_of([records.paths[index] for index in val_indices]), run.preprocessing),
              "train": evaluation_pixels(photos_of([records.paths[index] for index in train_indices]),
                                         run.preprocessing),
              "non_dogs": evaluation_pixels(list(photos.values()), run.preprocessing)}
    backbone, head = split_at_features(run.load_model())
    pretrained, imagenet = weights.pretrained_with_classifier(run.config["model"], len(run.class_names),
                                                              run.config["weights"])
    pretrained_backbone = split_at_features(pretrained)[0]
    kernel, bias = imagenet
    dog_classes = list(breeds.IMAGENET_DOG_CLASSES)

    def dog_mass(features):
        return tf.nn.softmax(features @ kernel + bias).numpy()[:, dog_classes].sum(axis=1)

    features = {split: backbone.predict(batch, batch_size=16, verbose=0) for split, batch in pixels.items()}
    means = not_a_dog.breed_means(features["train"], records.labels[train_indices], len(run.class_names))
    scores = {}
    for split, batch in pixels.items():
        scores[split] = {
            "imagenet_dog_mass_run": dog_mass(features[split]),
            "imagenet_dog_mass_pretrained": dog_mass(pretrained_backbone.predict(batch, batch_size=16, verbose=0)),
            "top_breed_probability": tf.nn.softmax(head.predict(features[split], verbose=0)).numpy().max(axis=1),
            "nearest_breed_cosine": not_a_dog.dog_scores(features[split], means),
        }
    for method in scores["val"]:
        threshold = not_a_dog.keep_threshold(scores["val"][method])
        accepted = [name for name, score in zip(photos, scores["non_dogs"][method]) if score >= threshold]
        print(method, json.dumps({
            "threshold": round(threshold, 4),
            "val_dogs_rejected": round(float(np.mean(scores["val"][method] < threshold)), 4),
            "train_dogs_rejected": round(float(np.mean(scores["train"][method] < threshold)), 4),
            "non_dogs_accepted": f"{len(accepted)} of {len(photos)}", "accepted": accepted,
            "highest_non_dog": round(float(scores["non_dogs"][method].max()), 4)}))


if __name__ == "__main__":
    main()
