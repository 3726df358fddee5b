"""A trained model made servable: BatchNorm folding, the SavedModel for TF Serving, the TFLite file.

Modules:
    fold: BatchNorms folded into the convolutions before them.
    saved_model: versioned SavedModels of one model or an ensemble, test-time views inside the graph.
    tflite: a TFLite file for phones, float32 or quantised, scored before it is written.
    quantize: the TFLite variants' converter settings, their measurement and the accuracy-drop refusal.
"""
