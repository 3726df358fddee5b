"""One experiment end to end: phases trained, the best model calibrated, saved, scored and exported."""

import atexit
import contextlib
import functools
import shutil
import time

import keras
import numpy as np

from tfdogs import config as config_lib, files, lock, models, weights
from tfdogs.data.preprocessing import FILE_NAME as PREPROCESSING_FILE
from tfdogs.evaluation import metrics, not_a_dog, plots
from tfdogs.evaluation.predictions import predict_logits, with_temperature
from tfdogs.serving.saved_model import export_saved_model
from tfdogs.training.callbacks import (
    BestValidationLogits,
    SyncFromChief,
    make_callbacks,
    read_best_pass,
    resolve_monitor,
)
from tfdogs.training.cluster import (
    PEER_ERRORS,
    Cluster,
    PeerLost,
    first_line,
    fit_under_multi_worker,
    peer_timeout,
    per_worker_dataset,
    read_task,
)
from tfdogs.training.devices import make_strategy, replica_facts, resolve_name, resolve_runtime, shard_by_data
from tfdogs.training.optimizer import compile_model, make_schedule
from tfdogs.training.phases import TrainingError, configure_phase, plan_phases
from tfdogs.training.baselines import IMAGENET_OVERLAP, zero_shot_baseline
from tfdogs.training.dog_check import fit_dog_check
from tfdogs.training.features import (CACHE_FOLDER, build_cache, inference_epochs, inference_of, on_features,
                                     split_at_features)
from tfdogs.training.prepare import build_datasets, evaluation_dataset, load_data, prepare_output
from tfdogs.training.resume import (
    PHASES_FILE,
    already_finished,
    backed_up_epoch,
    best_so_far,
    check_backups_kept,
    check_resumable,
    phase_is_finished,
    publish_run_state,
    read_finished_phases,
    read_history,
    receive_run_state,
    worker_scratch,
)
from tfdogs.training.timer import Timer


# The best epoch's validation logits, kept through an interruption (`BestValidationLogits`).
BEST_PASS_FILE = "backup/best_validation_pass.npz"


def trained_parameters(model, phases):
    """How many of the model's parameters some phase trains (feature-extract: the head's alone)."""
    return int(sum(np.prod(variable.shape) for layer in model.layers
                   if any(models.stage_of(layer.name) not in phase.frozen_stages for phase in phases)
                   for variable in layer.trainable_weights))


def build_model(config, num_classes, weights_source, class_names=None):
    """The run's network at its input size and head regularisation, from `weights_source` (None: random).

    With `class_names` and config ``head_init`` imagenet, the classifier starts from the weights'
    ImageNet rows of those breeds (`tfdogs.weights.start_head_from_imagenet`).
    """
    return build_with_classifier(config, num_classes, weights_source, class_names)[0]


def build_with_classifier(config, num_classes, weights_source, class_names=None):
    """`build_model`, and the weights' ImageNet classifier or None (`tfdogs.weights.pretrained_with_classifier`)."""
    head_from_imagenet = class_names if config["head_init"] == "imagenet" else None
    return weights.pretrained_with_classifier(config["model"], num_classes, weights_source,
                                              input_shape=(config["image_size"], config["image_size"], 3),
                                              dropout=config["dropout"], l1=config["l1"], l2=config["l2"],
                                              head_from_imagenet=head_from_imagenet)


def train(config, extra_callbacks=()):
    """Runs one experiment from a validated config (see `tfdogs.config`).

    Args:
        config: mapping from `tfdogs.config.resolve` or `validate`.
        extra_callbacks: Keras callbacks added to every phase's `fit`.

    With `distribute` multi-worker and a TF_CONFIG cluster, every worker
    calls this with the same config: the chief writes the run, the others
    train from temporary folders and return None.

    The chief (or the single process) holds the run folder's lock
    (`tfdogs.lock`) until the run ends: a second `train` into the same folder
    is refused at once, naming this one.

    Returns:
        The run folder (None on a worker other than the chief).
    """
    with contextlib.ExitStack() as ownership:
        return _train(config, extra_callbacks, ownership)


def _train(config, extra_callbacks, ownership):
    """`train`, with `ownership` (an ExitStack) holding the run folder's lock until it returns."""
    timer = Timer()
    config = requested = config_lib.validate(config)
    weights.require_installed(config["weights"], config["model"])  # a missing package stops before any folder
    task = read_task() if resolve_name(config["distribute"]) == "multi-worker" else None
    if task is None or task.is_chief:
        run_dir, export_dir, created = prepare_output(config)
        ownership.enter_context(lock.hold(run_dir / lock.RUN_LOCK, f"run folder {run_dir}"))  # before any file
    else:  # only the chief writes the run: this worker keeps what the strategy needs until it ends
        scratch = worker_scratch(task, config)
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        run_dir, export_dir, created = scratch / "run", scratch / "export", [scratch]
    ownership.enter_context(files.writes_finished())  # the last backup lands before the lock is let go
    config = {**config, "output": str(run_dir), "export_dir": str(export_dir)}
    runtime = resolve_runtime(config)
    cluster = None
    try:
        # First: multi-worker precedes other TF work. A worker that gives up waiting for its peers
        # removes the folders this run created.
        strategy = make_strategy(config["distribute"], cleanup=created)
        if task is not None:
            cluster = Cluster(task, peer_timeout())
            # Only the chief's output and export folders are used; verbose changes nothing trained.
            cluster.check_same_settings(requested, ignore=("verbose", "output", "export_dir"))
        check_resumable(config, run_dir)
        if task is None and already_finished(config, run_dir):
            print(f"{run_dir} holds this run, finished ({config['epochs']} epochs): nothing trained or exported "
                  f"again. A larger --epochs trains on from its last epoch.")
            return run_dir
        check_backups_kept(run_dir)
        runtime.update(replica_facts(strategy, config["batch_size"], config["learning_rate"],
                                                config["optimizer"]))
        chief_weights = receive_run_state(cluster, run_dir) if task and not task.is_chief else set()
        records, train_indices, val_indices = load_data(config, run_dir)
        timer.lap("data")
        if task and task.is_chief:
            publish_run_state(cluster, run_dir)
        if len(train_indices) < runtime["global_batch_size"]:
            raise config_lib.ConfigError(
                f"Config key 'batch_size' is {config['batch_size']} per replica ({runtime['replicas']} "
                f"replicas), larger than the {len(train_indices)} training images; lower it.")
        keras.utils.set_random_seed(config["seed"])
        keras.mixed_precision.set_dtype_policy(runtime["precision"])
        try:
            with strategy.scope():
                model, imagenet = build_with_classifier(config, len(records.class_names), config["weights"],
                                                        records.class_names)
            if task is not None:
                fit_under_multi_worker(model)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        timer.lap("model")
    except Exception as error:
        for folder in created:  # a run that never started leaves no empty folders behind
            shutil.rmtree(folder, ignore_errors=True)
        if cluster is not None:
            cluster.report(error)
        raise
    if config["data"] == "synthetic":  # where the generated photos are: evaluate, ensemble and predict read them
        config["data_dir"] = str(run_dir / "synthetic_data")
    config_lib.write(config, run_dir / "config.yaml")
    num_classes = len(records.class_names)
    final_size = config["finetune_image_size"] or config["image_size"]  # what the export takes

    @functools.cache  # resolved (and any guess about the checkpoint said) once per size
    def preprocessing_at(size):
        return weights.resolve_preprocessing(config["weights"], config["model"], size, config["weights_preprocessing"])

    preprocessing = preprocessing_at(final_size)
    preprocessing.save(run_dir / PREPROCESSING_FILE)  # evaluation, ensembles and predict read it back
    steps = len(train_indices) // runtime["global_batch_size"]
    if config["steps_per_epoch"]:
        steps = min(steps, config["steps_per_epoch"])
    pipelines = {}  # image size -> (train_epochs, val_dataset)

    def pipelines_at(size):
        """(train_epochs, val_dataset) at an image size, built once; the validation photos unsharded."""
        if size not in pipelines:
            global_config = {**config, "batch_size": runtime["global_batch_size"], "image_size": size}
            pipelines[size] = build_datasets(global_config, records, train_indices, val_indices,
                                             preprocessing_at(size), steps_per_epoch=steps)
        return pipelines[size]

    def evaluation_at(size, which):
        """The evaluation crops of the training ("train") or validation ("val") photos, in split order."""
        if which == "val":
            return pipelines_at(size)[1]
        global_config = {**config, "batch_size": runtime["global_batch_size"], "image_size": size}
        return evaluation_dataset(global_config, records, train_indices, preprocessing_at(size))

    def model_at(size, current):
        """The network at another input size, with the current weights (a ResNet's do not depend on it)."""
        if current.input_shape[1] == size:
            return current
        keras.mixed_precision.set_dtype_policy(runtime["precision"])
        try:
            with strategy.scope():
                resized = build_model({**config, "image_size": size}, len(records.class_names), weights_source=None)
            if task is not None:
                fit_under_multi_worker(resized)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        resized.set_weights(current.get_weights())
        return resized
    monitor = resolve_monitor(config, records.layout)
    print(f"The best checkpoint and early stopping follow {monitor}"
          + (f" ({records.layout} layout)." if config["monitor"] == "auto" else "."))

    started = time.time()
    finished = read_finished_phases(run_dir)
    resumed = False
    zero_shot_at_hand = None  # (validation features, ImageNet classifier) when the first frozen pass has them
    best_passes = {}  # 0-based epoch -> the logits of its validation pass, at final_size, when it was the best
    # (training features, validation features, folded backbone) a frozen last phase computed and ran
    dog_check_at_hand = (None, None, None)
    for phase in plan_phases(config):
        dog_check_at_hand = (None, None, None)  # a later phase trains the backbone, or was done before a resume
        done = run_dir / f"phase-{phase.name}.weights.h5"
        if phase_is_finished(finished.get(phase.name), phase) and (done.is_file() or done.name in chief_weights):
            if done.is_file():  # finished before an interruption (other workers: the chief's, in the next fit)
                model.load_weights(done)
            resumed = True
            continue
        backup_dir = run_dir / "backup" / phase.name
        first_epoch = max(phase.start_epoch, backed_up_epoch(backup_dir))
        if resumed or first_epoch > phase.start_epoch:
            print(f"Resuming the run in {run_dir} at epoch {first_epoch + 1} of {config['epochs']} "
                  f"(phase '{phase.name}', state from {backup_dir if first_epoch > phase.start_epoch else done}).")
            resumed = False  # said once
        size = phase.image_size or config["image_size"]
        model = model_at(size, model)
        train_epochs, val_dataset = pipelines_at(size)
        val_dataset = shard_by_data(val_dataset)
        factors = configure_phase(model, phase, config["freeze_bn"] and config["strategy"] != "scratch")
        fitted = model
        if on_features(config, phase, model, task is not None):
            backbone, fitted = split_at_features(model)  # the head: the model's own dropout and fc layers
        if fitted is not model:  # folded once: the cache or each epoch, then the "not a dog" check, run it
            forward = inference_of(backbone, runtime["frozen_precision"])
        if fitted is not model and config["feature_views"]:
            cache, seconds = build_cache(
                forward, train_epochs, lambda which: evaluation_at(size, which), config["feature_views"],
                config["seed"], folder=run_dir / CACHE_FOLDER,
                key={"phase": phase.name, "image_size": size, "views": config["feature_views"],
                     "precision": runtime["frozen_precision"]})
            print(f"Cached backbone features: {config['feature_views']} view(s) of each training photo "
                  + (f"computed in {seconds:.1f} s" if seconds else f"read back from {run_dir / CACHE_FOLDER}")
                  + "; the head trains on them, so augmentation is limited to "
                  + ("none (the evaluation crop)." if config["feature_views"] == 1 else "those views."))
            train_dataset = cache.train_epochs(first_epoch, phase.end_epoch - first_epoch,
                                               runtime["global_batch_size"], steps)
            val_dataset, val_features = cache.val_dataset(runtime["global_batch_size"]), cache.val[0]
            timer.lap("features")
        elif fitted is not model:  # the backbone runs as inference on each batch, the head trains on its features
            train_dataset, val_dataset, (val_features, _) = inference_epochs(
                forward, train_epochs(first_epoch, phase.end_epoch - first_epoch), val_dataset,
                runtime["global_batch_size"])
        if fitted is not model and phase.start_epoch == 0 and size == final_size and imagenet is not None:
            zero_shot_at_hand = (val_features, imagenet)  # the pretrained backbone's, at the exported size
        # the "not a dog" check's features (in the frozen precision, as the check computes its own), when this
        # frozen phase ends the run at the exported size: the validation photos', and with one cached view the
        # training photos' evaluation crops
        dog_check_at_hand = (None, None, None)
        if fitted is not model and size == final_size:
            one_view = config["feature_views"] == 1
            dog_check_at_hand = (cache.features[0].numpy() if one_view else None, val_features, forward)
        schedule = make_schedule(config, runtime["learning_rate"], steps, phase.start_epoch)
        with strategy.scope():  # metrics and optimizer variables are mirrored too
            compile_model(fitted, config, schedule, factors, runtime["jit_compile"])
        history = read_history(run_dir / "history.csv")
        callbacks, non_finite, checkpoint = make_callbacks(
            config, run_dir, phase, history, monitor,
            saved_model=model if fitted is not model else None,  # best.weights.h5 holds the whole model
            strategy=strategy if task is not None else None)
        if fitted is model and task is None:
            train_dataset = shard_by_data(train_epochs(first_epoch, phase.end_epoch - first_epoch))
        elif fitted is model:  # each worker reads its own slice of every global batch
            train_dataset = per_worker_dataset(
                strategy, lambda part: train_epochs(first_epoch, phase.end_epoch - first_epoch, part))
            callbacks.append(SyncFromChief(strategy))  # after the backup's restore, which only the chief has
        recorder = None  # keeps the best epoch's validation logits, which then score the final model
        if task is None and runtime["replicas"] == 1 and not runtime["jit_compile"] and size == final_size:
            recorder = BestValidationLogits(fitted, monitor, best_so_far(history, monitor)[0],
                                            path=run_dir / BEST_PASS_FILE)
            callbacks.append(recorder)
        try:  # from the backed-up epoch, whose weights and optimizer state ResumeBackup restores
            fit = fitted.fit(train_dataset, validation_data=val_dataset, epochs=phase.end_epoch,
                            initial_epoch=first_epoch, steps_per_epoch=steps, shuffle=False,
                            callbacks=callbacks + list(extra_callbacks),
                            verbose=1 if config["verbose"] == "auto" else config["verbose"])
        except PEER_ERRORS as error:
            if task is None:
                raise
            raise PeerLost(f"{task.name} lost a peer while training phase '{phase.name}' "
                                      f"({first_line(error)}).") from None
        if non_finite.stopped_at is not None:
            epoch, batch = non_finite.stopped_at
            kept = run_dir / "best.weights.h5"
            raise TrainingError(
                f"Training loss became non-finite at epoch {epoch + 1}, batch {batch}; stopped. "
                f"The best weights so far are kept in {kept if kept.is_file() else '(none yet)'}. "
                "Lower --learning-rate or check the data.")
        if recorder is not None and recorder.epoch is not None:
            best_passes[recorder.epoch] = recorder.logits
        files.save_weights(model, done, copy_of=checkpoint.ended_with)  # a copy where a checkpoint holds them
        last_epoch = max(fit.epoch, default=first_epoch - 1) + 1
        finished[phase.name] = {"end_epoch": phase.end_epoch, "epochs_run": last_epoch}
        files.write_json(finished, run_dir / PHASES_FILE)
        shutil.rmtree(run_dir / CACHE_FOLDER, ignore_errors=True)
        if phase.end_epoch < config["epochs"]:  # a later phase follows: this one cannot be extended
            shutil.rmtree(backup_dir, ignore_errors=True)
        timer.lap("phases", phase.name)
    train_seconds = time.time() - started
    if task is not None and not task.is_chief:
        return None  # the chief writes the run folder and the export

    history = read_history(run_dir / "history.csv")
    files.replace_into(run_dir / "history.csv", lambda temporary: history.to_csv(temporary, index=False))
    # float32, all trainable, no optimizer, at the size it is exported at: the best epoch's weights
    final_model = build_model({**config, "image_size": final_size}, num_classes, weights_source=None)
    best_weights = run_dir / "best.weights.h5"
    if best_weights.is_file():
        final_model.load_weights(best_weights)
    else:
        final_model.set_weights(model.get_weights())
    val_labels = records.labels[val_indices]
    _, best_epoch = best_so_far(history, monitor)
    if best_epoch not in best_passes:  # a resumed run whose best epoch came before the interruption
        best_passes.update(read_best_pass(run_dir / BEST_PASS_FILE))
    if best_epoch in best_passes:  # the best checkpoint's own validation pass: nothing runs again
        best_phase = next(phase for phase in plan_phases(config) if phase.start_epoch <= best_epoch < phase.end_epoch)
        pass_precision = runtime["frozen_precision" if on_features(config, best_phase, model, task is not None)
                                else "precision"]
        logits, scored_by = best_passes[best_epoch], f"the best epoch's validation pass ({pass_precision})"
    else:  # e.g. the best epoch at another image size, or trained on several replicas
        logits = predict_logits(final_model, shard_by_data(pipelines_at(final_size)[1]))
        scored_by = "model.keras (float32) on the validation photos"

    raw_table, raw_ece = metrics.reliability(metrics.softmax(logits), val_labels)
    summary = {
        "model": config["model"], "weights": config["weights"], "strategy": config["strategy"],
        "num_classes": num_classes, "num_train": int(len(train_indices)), "num_val": int(len(val_indices)),
        "epochs_run": int(len(history)), "monitor": monitor,
        "best_epoch": None if best_epoch is None else best_epoch + 1,
        "val": {**metrics.scores(metrics.softmax(logits), val_labels), "ece": raw_ece},
        "val_scored_by": scored_by,
        "peak_val_accuracy": float(history["val_accuracy"].max()),
        "final_val_accuracy": float(history["val_accuracy"].iloc[-1]),
        "baselines": metrics.baselines(records.labels[train_indices], val_labels, num_classes, records.class_names),
        "train_seconds": round(train_seconds, 1),
        "parameters": {"total": int(final_model.count_params()),
                       "trainable": trained_parameters(final_model, plan_phases(config))},
        **runtime,
    }
    if config["calibrate"]:
        temperature = metrics.fit_temperature(logits, val_labels)
        summary["val_calibrated"] = {**metrics.calibrated_scores(logits, val_labels, temperature),
                                     "fitted_on": "the validation split these scores are measured on"}
        calibrated_table, calibrated_ece = metrics.reliability(metrics.softmax(logits, temperature), val_labels)
        plots.plot_reliability({"raw": (raw_table, raw_ece), f"temperature {temperature:.3f}": (
            calibrated_table, calibrated_ece)}, run_dir / "calibration.png", title=f"{run_dir.name}: validation")
        final_model = with_temperature(final_model, temperature)
    timer.lap("final_evaluation")
    gate, summary["not_a_dog"] = fit_dog_check(config, final_model, evaluation_at(final_size, "train"),
                                               evaluation_at(final_size, "val"), records.labels[train_indices],
                                               num_classes, preprocessing, at_hand=dog_check_at_hand,
                                               precision=runtime["frozen_precision"])
    not_a_dog.save(gate, summary["not_a_dog"], run_dir)
    print(not_a_dog.summary_line(summary["not_a_dog"]))
    timer.lap("not_a_dog")
    files.save_model(final_model, run_dir / "model.keras")
    plots.plot_curves(history, run_dir / "curves.png", title=run_dir.name)
    version_dir = export_saved_model(final_model, records.class_names, export_dir, preprocessing=preprocessing,
                                     metadata={"run": str(run_dir.resolve()), "config": config},
                                     gates=[gate], gates_facts=[summary["not_a_dog"]])
    summary["export"] = str(version_dir)
    timer.lap("export")
    zero_shot = zero_shot_baseline(config, records, val_indices, at_hand=zero_shot_at_hand)
    if zero_shot is not None:
        summary["baselines"]["imagenet_zero_shot"] = zero_shot
        files.write_json(zero_shot, run_dir / "zeroshot.json")
    if config["weights"] is not None:
        summary["imagenet_overlap"] = IMAGENET_OVERLAP
    timer.lap("zero_shot")
    summary["seconds"] = timer.summary()
    files.write_json(summary, run_dir / "metrics.json")
    return run_dir

