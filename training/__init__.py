"""Fine-tuning and evaluation of the SAM2 / SAM3 models used by sam_gap_ros.

``training.common`` holds the infrastructure shared by both trainers (config, freezing,
optimiser, AMP, checkpoints, logging) and ``training.losses`` the loss functions.
"""
