"""Model bundles: loading a bundle directory into a Pipeline, the demo bundle, clean accuracy of a
split. Torch-free metadata stays in ``models.bundle_meta``.
"""
