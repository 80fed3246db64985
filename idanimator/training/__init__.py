"""Training the face adapter (random-reference training, the paper's method) on accelerate.

Only the face adapter learns: the resampler, the face key/value projections and the rank-128 LoRA of every
spatial cross-attention. ``train`` is the `train` command's script, read top to bottom (the frozen models,
the loss, the loop, checkpoints and resume, ``log_validation``); beside it ``config`` (every setting, checked
before torch is imported), ``dataset`` (the manifest's clips as tensors, and which reference faces each is
conditioned on) and ``adapter_training`` (the trainable adapter on the frozen motion UNet, and where its first
weights come from). Run it with ``python -m idanimator train``.
"""
