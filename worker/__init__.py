"""The GPU worker: resumable training, checkpoints, reports. Imports nothing of gpujobs."""
