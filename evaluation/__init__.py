"""Evaluation of generated videos: FVD and FID with user-supplied TorchScript detectors
(`detectors`), the Fréchet distance (`frechet`), and the metrics that need no weights (`suite`).
Used by `scripts.evaluate`, the benchmark and periodic evaluation during stage-2 training."""
