"""Building an ID-oriented training set from a folder of human videos (the paper's dataset recipe).

``python -m idanimator build-dataset`` cuts each video into shots (:mod:`.shots`), keeps clips long enough to
train on, collects a pool of aligned faces per clip (:mod:`.facepool`), writes decoupled captions of the
person and of the action merged by a rewriter (:mod:`.captions`), and lists every finished clip in
``OUT/manifest.jsonl`` (:mod:`.manifest`, which the trainer reads). :mod:`.build` runs it all, resumably.
"""
