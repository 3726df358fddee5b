"""Finished run folders and what is done with them after training.

Modules:
    folder: a run or ensemble folder read back (model, breeds, split, preprocessing), predictions over paths.
    evaluation: a run scored breed by breed, with its picture report.
    ensemble: runs averaged into one model, scored and exported.
    comparison: the study's table of runs, ensembles and baselines.
    predictor, explain: answers for photos from a run, an ensemble or a SavedModel; their heat maps.
    submission: the Kaggle submission file.
"""
