"""SavedModel export for TF Serving: one export for runs, ensembles and test-time views.

An export is a numbered version folder under a base folder
(`saved_models/<run>/1/`, `2/`, ...), the layout TF Serving watches. Each holds
two signatures with the same outputs:

- `serving_default`: `image_bytes`, a batch of encoded images (`tf.string`:
  JPEG, PNG, GIF, BMP or WebP), decoded, resized and normalised exactly as the
  validation pipeline does. Bytes that the data check converts with Pillow
  before training (palette BMP, CMYK JPEG, TIFF, PNG or WebP with an EXIF
  orientation, over 4096 px a side) are refused with an InvalidArgumentError
  saying so (`tfdogs.data.decode.decode_served_image`); `tfdogs.predict`
  converts them first, as the check does.
- `serving_images`: `images`, float32 RGB pixels in [0, 255], shape
  `[batch, height, width, 3]` of any size, preprocessed the same way
  (rounded to whole values first, as the 8-bit images Pillow resizes).

Outputs: `probabilities` `[batch, classes]` (float32, rows sum to 1),
`top5_breeds` `[batch, k]` (strings) and `top5_probabilities` `[batch, k]`,
with k = min(5, classes). An export of a run that started from pretrained
weights also answers whether each photo shows a dog
(`tfdogs.evaluation.not_a_dog`): `dog_score` `[batch]` (float32, the cosine
similarity of the photo's pooled features to the nearest breed's mean) and
`not_a_dog` `[batch]` (bool, `dog_score` below the threshold that kept 99 %
of the run's validation dog photos); `tfdogs.json`'s `not_a_dog` holds the
threshold and what it measured. An ensemble's `dog_score` is the weighted mean
of its members' that have one, and its threshold the same mean of theirs, so a
photo every member keeps, the ensemble keeps. `export_saved_model` is the one export: of a
trained run, of `python -m tfdogs.export` and of an ensemble (which averages
its members' probabilities, each member with its own input preprocessing).
BatchNorms are folded into the convolutions, and each member's
`tfdogs.data.preprocessing.Preprocessing` record is applied inside the graph and
written to `tfdogs.json`. Loading the export needs TensorFlow alone.

With test-time augmentation (`--tta 2` or `--tta 10`) the signatures and
outputs stay the same: each image's views (`data.eval_views`) are taken
inside the graph, and `probabilities` is the mean of the views' softmax
probabilities; `tfdogs.json` records the views (`tta_views`, `tta_view_names`).

`tfdogs.serving.tflite.export_tflite` writes a TFLite file instead (float32,
float16, dynamic-range or full-integer int8), for phones: it takes already
resized and centre-cropped pixels (see its docstring for why).

Example:
    loaded = tf.saved_model.load("saved_models/resnet18-demo/1")
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([jpeg]))
"""

import json
import pathlib

import keras
import tensorflow as tf

from tfdogs import data, files, lock
from tfdogs.data.decode import decode_served_image
from tfdogs.data.preprocessing import Preprocessing
from tfdogs.serving.fold import fold_batch_norms, folding_counts
from tfdogs.evaluation import metrics, not_a_dog
from tfdogs.models import FEATURE_LAYER

METADATA_FILE = "tfdogs.json"


def next_version(export_base):
    """Returns the next free numeric version under `export_base` (1 when empty)."""
    export_base = pathlib.Path(export_base)
    versions = [int(path.name) for path in export_base.glob("*") if path.name.isdigit()]
    return max(versions, default=0) + 1


class ServingModule:
    """Builds the serving functions around one or more trained classifiers.

    Each member keeps its own `Preprocessing`: every image is decoded once and
    preprocessed once per distinct record among the members (a LeNet-5 at
    64 px and a ResNet at 224 px can vote on the same request), exactly as
    each member's validation pipeline does, and the members' softmax
    probabilities are averaged with `model_weights`. With `views` > 1
    (test-time augmentation), each member's probabilities are first the mean
    of its softmax over the image's views, `data.eval_views`.
    """

    def __init__(self, models, class_names, preprocessing, model_weights=None, views=1, gates=None):
        if views not in data.TTA_VIEWS:
            raise ValueError(f"Test-time augmentation takes {', '.join(map(str, data.TTA_VIEWS))} views; "
                             f"got {views!r}.")
        self.views = views
        self.models = list(models)
        self.class_names = tf.constant(list(class_names))
        records = preprocessing_records(preprocessing, len(self.models))
        self.pipelines = list(dict.fromkeys(records))  # distinct records, first-seen order
        self.pipeline_of_member = [self.pipelines.index(record) for record in records]
        self.model_weights = metrics.normalised_weights(model_weights, len(self.models))
        self.gates = list(gates) if gates is not None else [None] * len(self.models)
        if len(self.gates) != len(self.models):
            raise ValueError(f"{len(self.gates)} 'not a dog' gates given for {len(self.models)} models.")
        gated = [index for index, gate in enumerate(self.gates) if gate is not None]
        self.gate_weights = (metrics.normalised_weights([self.model_weights[index] for index in gated], len(gated))
                             if gated else [])
        self.threshold = (sum(weight * self.gates[index].threshold for weight, index in zip(self.gate_weights, gated))
                          if gated else None)
        self.num_classes = len(class_names)
        self.top_k = min(5, len(class_names))
        # Each network and each preprocessing traced once, however many signatures call them: tracing
        # ResNet-18 and the exact resize again for the second signature cost about 0.3 s of every export.
        self._forward = [tf.function(
            data.traced_as_written(lambda images, model=with_features(model, gate): model(images, training=False)),
            autograph=False, input_signature=[tf.TensorSpec([None, *[records[index].image_size] * 2, 3], tf.float32)])
            for index, (model, gate) in enumerate(zip(self.models, self.gates))]
        self._preprocess = tf.function(  # whole values in [0, 255]: a uint8 image gives the same crops as float32
            data.traced_as_written(lambda image: tuple(
                data.eval_views(image, self.views, **record.as_dict()) for record in self.pipelines)),
            input_signature=[tf.TensorSpec([None, None, 3], tf.float32)], autograph=False)

    def probabilities(self, images_per_pipeline):
        """Weighted mean of the members' softmax probabilities (each the mean over the views), float32.

        Args:
            images_per_pipeline: per distinct `Preprocessing`, [batch, views, size, size, 3].
        """
        return self._answers(images_per_pipeline)[0]

    def _answers(self, images_per_pipeline):
        """(probabilities [batch, classes], dog_score [batch] or None when no member has a gate)."""
        members, dog_scores = [], []
        for forward, pipeline, gate in zip(self._forward, self.pipeline_of_member, self.gates):
            size = self.pipelines[pipeline].image_size
            images = images_per_pipeline[pipeline]
            outputs = forward(tf.reshape(images, [-1, size, size, 3]))
            logits = tf.cast(outputs if gate is None else outputs[0], tf.float32)
            # the class count stays static, so the signatures keep probabilities' shape (-1, classes)
            per_view = tf.reshape(tf.nn.softmax(logits, axis=-1), [-1, self.views, self.num_classes])
            members.append(tf.reduce_mean(per_view, axis=1))
            if gate is not None:
                dog_scores.append(tf.reduce_mean(tf.reshape(dog_score(outputs[1], gate), [-1, self.views]), axis=1))
        probabilities = metrics.weighted_mean(members, self.model_weights)
        return probabilities, metrics.weighted_mean(dog_scores, self.gate_weights) if dog_scores else None

    def _outputs(self, images_per_pipeline):
        probabilities, score = self._answers(images_per_pipeline)
        top_probabilities, top_indices = tf.math.top_k(probabilities, k=self.top_k)
        outputs = {
            "probabilities": probabilities,
            "top5_breeds": tf.gather(self.class_names, top_indices),
            "top5_probabilities": top_probabilities,
        }
        if score is not None:
            outputs.update(dog_score=score, not_a_dog=score < self.threshold)
        return outputs

    def _preprocess_all(self, image):
        return self._preprocess(tf.cast(image, tf.float32))

    def _map(self, function, batch):
        return tf.map_fn(function, batch, fn_output_signature=tuple(
            tf.TensorSpec([self.views, record.image_size, record.image_size, 3], tf.float32)
            for record in self.pipelines))

    def from_bytes(self, image_bytes):
        # Bytes the data check would have converted before training are refused, not served other pixels.
        return self._outputs(self._map(lambda encoded: self._preprocess_all(decode_served_image(encoded)), image_bytes))

    def from_images(self, images):
        return self._outputs(self._map(self._preprocess_all, images))


def with_features(model, gate):
    """The model, or with a gate a model answering (logits, pooled features) from the same layers."""
    if gate is None:
        return model
    return keras.Model(model.inputs, [model.outputs[0], model.get_layer(FEATURE_LAYER).output], name=model.name)


def dog_score(features, gate):
    """`not_a_dog.dog_scores` in the graph: cosine similarity to the nearest breed mean, float32 [N]."""
    features = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1, epsilon=1e-24)
    return tf.reduce_max(tf.matmul(features, tf.constant(gate.breed_means), transpose_b=True), axis=-1)


def not_a_dog_facts(module, gates_facts=None):
    """`tfdogs.json`'s `not_a_dog`: the threshold the graph holds and what each member's gate measured."""
    if module.threshold is None:
        return {"can_reject": False,
                "why": "no member started from pretrained weights: features learned from the breeds alone "
                       "cannot tell a dog from anything else"}
    return {"can_reject": True, "threshold": module.threshold, "method": not_a_dog.METHOD,
            "members": list(gates_facts) if gates_facts is not None else None}


def preprocessing_records(preprocessing, count):
    """One `Preprocessing` per member from one record or a list of them."""
    records = [preprocessing] * count if isinstance(preprocessing, Preprocessing) else list(preprocessing)
    if len(records) != count:
        raise ValueError(f"{len(records)} preprocessing records given for {count} models.")
    for record in records:
        if not isinstance(record, Preprocessing):
            raise TypeError(f"preprocessing must be tfdogs.data.preprocessing.Preprocessing records; got {record!r}.")
    return records


def serving_module(models, class_names, preprocessing, model_weights=None, views=1, gates=None):
    """The `ServingModule` every export and in-process prediction serves: BatchNorms folded.

    Folding (`tfdogs.serving.fold.fold_batch_norms`) changes float32 outputs by
    about 1e-6 and serves faster; doing it here, in one place, means the
    training export, `python -m tfdogs.export`, ensembles and `tfdogs.predict`
    answer alike.

    Args:
        models: a Keras classifier returning logits, or a list of them (an ensemble).
        class_names: breed names in class-index order.
        preprocessing: one `Preprocessing` for all models, or one per model.
        model_weights: optional ensemble weights (normalised to sum to 1).
        views: test-time augmentation views per image, 1 (none), 2 or 10 (`data.eval_views`).
        gates: per model, its `not_a_dog.DogGate` or None (see the module's docstring).

    Returns:
        A `ServingModule`.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    return ServingModule([fold_batch_norms(model) for model in models], class_names, preprocessing,
                         model_weights, views, gates)


def export_saved_model(models, class_names, export_base, *, preprocessing, model_weights=None, metadata=None,
                       views=1, gates=None, gates_facts=None):
    """Writes the next numeric version of a SavedModel under `export_base`: the one export of tfdogs.

    Training, `python -m tfdogs.export` and `tfdogs.ensemble` all call this: a
    single model or an ensemble, BatchNorms folded (see `serving_module`),
    each member with its own `Preprocessing`. The version is written to a
    hidden temporary folder and renamed into place, so an interrupted export
    never leaves a half-written version that TF Serving would try to load;
    earlier versions stay untouched. `tfdogs.json` beside it records the
    breeds, the members and their preprocessing records, and the
    test-time augmentation views (`tta_views`, `tta_view_names`).

    Args:
        models: a Keras classifier returning logits, or a list of them (an ensemble).
        class_names: breed names in class-index order.
        export_base: folder holding the numbered versions.
        preprocessing: one `Preprocessing` for all models, or one per model.
        model_weights: optional ensemble weights (normalised to sum to 1).
        metadata: extra JSON-serialisable facts to store in `tfdogs.json`.
        views: test-time augmentation views per image baked into the graph, 1 (none), 2 or 10
            (`data.eval_views`); the signatures stay the same.
        gates: per model, its `not_a_dog.DogGate` or None: with any, the signatures add `dog_score`
            and `not_a_dog`.
        gates_facts: per model, what its gate measured (its run's `not_a_dog.json`), for `tfdogs.json`.

    Returns:
        The path of the new version folder.
    """
    models = [models] if isinstance(models, keras.Model) else list(models)
    records = preprocessing_records(preprocessing, len(models))
    module = serving_module(models, class_names, records, model_weights, views, gates)
    facts = {
        "class_names": list(class_names),
        # the record every member shares, or null when members differ (see member_preprocessing)
        "preprocessing": module.pipelines[0].as_dict() if len(module.pipelines) == 1 else None,
        "member_preprocessing": [record.as_dict() for record in records],
        "members": [model.name for model in models],
        "member_weights": module.model_weights,
        "batch_norms_folded": folding_counts(module.models),
        # probabilities = mean over these views of each view's softmax (data.eval_views)
        "tta_views": views,
        "tta_view_names": list(data.TTA_VIEWS[views]),
        "not_a_dog": not_a_dog_facts(module, gates_facts),
        **(metadata or {}),
    }
    return _write_version(module, export_base, facts)


def write_saved_model(models, endpoints, path):
    """Writes a SavedModel at `path`: the models' variables and one signature per endpoint.

    Args:
        models: the Keras models whose variables the endpoints read.
        endpoints: {signature name: (function, input signature)}.
        path: the folder to write.

    Each function is traced once, as written (see `data.traced_as_written`),
    inside the save: TensorFlow keys its traces on whether a save is under
    way, so a function traced before `tf.saved_model.save` is traced again
    in it (Keras' `ExportArchive` does that, as this function did: about
    0.3 s of each ResNet-18 export). The loaded object is as Keras' was: the
    two signatures, each as an attribute too, and `variables`
    (`trainable_variables`, `non_trainable_variables`).
    """
    # The same root object as Keras' export: its variables listed under the same three names.
    root = tf.__internal__.tracking.AutoTrackable()
    root.variables = [variable.value for model in models for variable in model.variables]
    root.trainable_variables = [variable.value for model in models for variable in model.trainable_variables]
    root.non_trainable_variables = [variable.value for model in models
                                    for variable in model.non_trainable_variables]
    signatures = {}
    for name, (function, input_signature) in endpoints.items():
        signatures[name] = tf.function(function, input_signature=input_signature, autograph=False)
        setattr(root, name, signatures[name])
    tf.saved_model.save(root, str(path), signatures=signatures)


def _write_version(module, export_base, facts):
    """Writes the module's two signatures as the next numeric version, atomically, with `tfdogs.json` facts."""
    export_base = pathlib.Path(export_base)
    export_base.mkdir(parents=True, exist_ok=True)
    endpoints = {
        "serving_default": (module.from_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")]),
        "serving_images": (module.from_images, [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]),
    }

    def write(temporary):
        write_saved_model(module.models, endpoints, temporary)
        (temporary / METADATA_FILE).write_text(json.dumps(facts, indent=2))

    with lock.hold(export_base / lock.RUN_LOCK, f"export folder {export_base}"):  # one version number each
        return files.replace_into(export_base / str(next_version(export_base)), write)


def read_metadata(version_dir):
    """Returns the `tfdogs.json` facts stored beside a SavedModel version."""
    path = pathlib.Path(version_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {version_dir} is not a tfdogs SavedModel export.")
    return json.loads(path.read_text())


def latest_version(export_base):
    """Returns the highest numeric version folder under `export_base`, or the folder itself if it is a version."""
    export_base = pathlib.Path(export_base)
    if (export_base / "saved_model.pb").is_file():
        return export_base
    versions = sorted((path for path in export_base.glob("*") if path.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise FileNotFoundError(f"No numeric SavedModel version folder (1/, 2/, ...) in {export_base}.")
    return versions[-1]
