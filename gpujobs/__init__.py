"""gpujobs: fault-tolerant GPU training jobs on Vast.ai."""
