"""Training the face adapter (random-reference training, the paper's method) on accelerate.

Only the face adapter learns: the resampler, the face key/value projections and the rank-128 LoRA of every
spatial cross-attention. The modules, one job each: ``config`` (the settings), ``references`` (which faces
a clip is conditioned on), ``data`` (the manifest's clips as tensors), ``modules`` (the trainable adapter on
the frozen motion UNet), ``init`` (where its first weights come from), ``parts`` (the frozen models),
``objective`` (the loss), ``checkpoints`` (saving and exact resume), ``validation`` (periodic videos) and
``loop`` (the accelerate loop that ties them together). Run it with ``python -m idanimator train``.
"""
