"""The motion-consistency defence: the MC loss, the purification loop, the Pipeline that decides,
purifies and classifies, and the clean calibration.
"""
