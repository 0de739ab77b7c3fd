"""Training outside the serving path: RAFT and I3D on synthetic motion, the shared classifier fit, flow
caches, fine-tuning.
"""
