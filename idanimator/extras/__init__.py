"""Options beyond the release, each applied around one denoising call and undone after it: style LoRAs,
FreeInit, long videos (FreeNoise context windows), structure control (SparseCtrl, ControlNet) and the fast
mode (AnimateLCM). The request (:mod:`idanimator.request`) holds their values; the pipeline's ``denoise`` puts
them on, one ``with`` each, around its one diffusers call.
"""
