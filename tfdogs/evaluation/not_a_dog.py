""""Not a dog": how far a photo's pooled features lie from every breed the run learned.

The score of a photo is the cosine similarity of its pooled backbone features
(the ``avgpool`` output every tfdogs head starts from) to the nearest breed's
mean feature over the run's training photos (their evaluation crops). A dog
of a known breed lies near its breed's mean; a cat, a person or a rocket lies
far from all of them. The threshold is set on the validation photos to keep
99 % of them (`keep_threshold`); a photo scoring below it is "not a dog".

Why this score, measured (docs/serving.md, "Not a dog"): on dogs10 with
EfficientNet-Lite0 from its ImageNet weights, thresholds keeping every
validation dog, against the 19 real non-dog photos of `tfdogs.data.non_dogs`:

- the breed head's top probability accepted 16 (feature extraction) and 18 (fine-tune)
  of 19: a confident breed for a person or a rocket, as every classifier gives;
- the ImageNet head's probability mass on its 118 dog classes, on the run's
  backbone, accepted 0 after feature extraction but 1 (grass) after fine-tuning,
  whose backbone has moved away from the ImageNet head; on the pretrained
  backbone it stayed at 0, at the cost of a second network in the export;
- this score accepted 0 of 19 after both, on the run's own backbone, with the
  highest non-dog score 0.35 / 0.39 against thresholds of 0.53 / 0.57.

Only runs that start from pretrained weights get a check: features trained
from random weights on the breeds alone know nothing of the rest of the world.
"""

import dataclasses
import pathlib

import numpy as np

from tfdogs import files

KEEP = 0.99  # the share of validation dog photos the threshold keeps
METHOD = ("cosine similarity of the pooled features to the nearest breed's mean training feature; "
          "below the threshold: not a dog")
GATE_FILE = "not_a_dog.npz"  # in a run folder: the breed means and the threshold
FACTS_FILE = "not_a_dog.json"  # in a run folder: how the threshold was set and what it measured


@dataclasses.dataclass(frozen=True)
class DogGate:
    """What an export keeps to say "not a dog".

    Attributes:
        breed_means: float32 [breeds, features], each row the unit-length mean of a breed's
            training features.
        threshold: scores below it are "not a dog".
    """

    breed_means: np.ndarray
    threshold: float

    def scores(self, features):
        """Each photo's cosine similarity to the nearest breed mean: float32 [N] in [-1, 1]."""
        return dog_scores(features, self.breed_means)


def unit_rows(values, epsilon=1e-12):
    """Each row divided by its Euclidean length (float32); an all-zero row stays zero."""
    values = np.asarray(values, np.float32)
    return values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), epsilon)


def breed_means(features, labels, num_classes):
    """float32 [num_classes, features]: each breed's mean feature, made unit length.

    Raises:
        ValueError: a breed has no training photo, naming its class index.
    """
    features, labels = np.asarray(features, np.float32), np.asarray(labels)
    missing = [index for index in range(num_classes) if not np.any(labels == index)]
    if missing:
        raise ValueError(f"No training photo of class(es) {missing}: a breed mean needs at least one.")
    return unit_rows(np.stack([features[labels == index].mean(axis=0) for index in range(num_classes)]))


def dog_scores(features, means):
    """float32 [N]: the cosine similarity of each feature row to the nearest row of `means` (unit rows)."""
    return (unit_rows(features) @ np.asarray(means, np.float32).T).max(axis=1)


def keep_threshold(scores, keep=KEEP):
    """The highest threshold that keeps at least `keep` of `scores` (a photo is kept when score >= threshold).

    With n photos, at most floor((1 - keep) * n) of them fall below it: the lowest score for fewer
    than 100 photos at keep = 0.99.
    """
    scores = np.sort(np.asarray(scores, np.float64))
    if scores.size == 0:
        raise ValueError("No validation photo to set the 'not a dog' threshold on.")
    allowed = int(np.floor((1.0 - keep) * scores.size + 1e-9))
    return float(scores[allowed])


def fit(train_features, train_labels, val_features, num_classes, keep=KEEP):
    """A `DogGate` from a run's training features (breed means) and validation features (threshold)."""
    means = breed_means(train_features, train_labels, num_classes)
    return DogGate(means, keep_threshold(dog_scores(val_features, means), keep))


def rates(gate, val_features, non_dog_features=None, non_dog_names=()):
    """What the gate does on the validation dogs, and on real non-dog photos when given.

    Returns:
        {"threshold", "keep", "method", "val_dogs_rejected" (share), "val_dogs": count,
        "non_dogs_accepted" (share, or None), "non_dogs": count, "non_dogs_accepted_names",
        "highest_non_dog_score", "lowest_val_dog_score"}.
    """
    val_scores = gate.scores(val_features)
    facts = {"method": METHOD, "keep": KEEP, "threshold": gate.threshold,
             "val_dogs": int(val_scores.size), "val_dogs_rejected": float(np.mean(val_scores < gate.threshold)),
             "lowest_val_dog_score": float(val_scores.min()),
             "non_dogs": 0, "non_dogs_accepted": None, "non_dogs_accepted_names": [], "highest_non_dog_score": None}
    if non_dog_features is not None and len(non_dog_features):
        scores = gate.scores(non_dog_features)
        accepted = scores >= gate.threshold
        facts.update(non_dogs=int(scores.size), non_dogs_accepted=float(np.mean(accepted)),
                     non_dogs_accepted_names=[name for name, kept in zip(non_dog_names, accepted) if kept],
                     highest_non_dog_score=float(scores.max()))
    return facts


def summary_line(facts):
    """One line for the end of a run: the threshold and both measured rates."""
    if not facts.get("can_reject", True):
        return f"Not a dog: this run cannot reject photos ({facts['why']})."
    line = (f"Not a dog: threshold {facts['threshold']:.3f} keeps {100 * (1 - facts['val_dogs_rejected']):.1f} % of "
            f"the {facts['val_dogs']} validation dog photos")
    if facts["non_dogs_accepted"] is None:
        return line + f"; non-dog photos not measured ({facts.get('non_dogs_missing', 'none at hand')})."
    accepted = round(facts["non_dogs_accepted"] * facts["non_dogs"])
    return (line + f"; it accepts {accepted} of {facts['non_dogs']} real non-dog photos "
            f"({100 * facts['non_dogs_accepted']:.1f} %, highest score {facts['highest_non_dog_score']:.3f}).")


def save(gate, facts, run_dir):
    """Writes `not_a_dog.npz` (the gate, when there is one) and `not_a_dog.json` (the facts) into a run folder."""
    run_dir = pathlib.Path(run_dir)
    if gate is not None:
        def write(temporary):
            with open(temporary, "wb") as file:
                np.savez(file, breed_means=gate.breed_means, threshold=np.float64(gate.threshold))

        files.replace_into(run_dir / GATE_FILE, write)
    files.write_json(facts, run_dir / FACTS_FILE)


def load(run_dir):
    """The run's `DogGate`, or None when it has none (runs from random weights, or older runs)."""
    path = pathlib.Path(run_dir) / GATE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        return DogGate(np.asarray(stored["breed_means"], np.float32), float(stored["threshold"]))
