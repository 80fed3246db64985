"""Options beyond the release, each applied around one denoising call and undone after it: style LoRAs,
FreeInit, long videos (FreeNoise context windows), structure control (SparseCtrl, ControlNet) and the fast
mode (AnimateLCM). ``spec`` describes a request's options as plain data; ``apply`` puts them on a pipeline.
"""
