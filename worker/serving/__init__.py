"""The model worker's life: the RQ worker class, batching across jobs, the job function, per-clip
inference and figures. Needs torch.
"""
