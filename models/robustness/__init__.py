"""The robustness harness: attacks (transfer and through the defence), their spec strings, the clip-
major evaluation and its report.
"""
