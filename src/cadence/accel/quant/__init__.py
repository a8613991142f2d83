"""Bit reduction: quantized linears (FP8/INT8 W8A8, weight-only INT8/INT4, simulated
NVFP4/MXFP4 with an SVDQuant low-rank branch), calibrated across the timestep set, mixed
precision by per-layer sensitivity, and saving/loading quantized transformers."""
